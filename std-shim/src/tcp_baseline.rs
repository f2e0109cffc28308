//! A raw-socket baseline for `kvxfer bench --tcp-baseline`: what plain TCP
//! on loopback gives for the same request size, measured in the same run,
//! so that the network path (UCX `tcp`, libfabric `tcp;ofi_rxm`) can be
//! compared with it by ratio.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kvxfer_core::Error;

/// What raw TCP gave.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpBaseline {
    /// Bytes per request.
    pub request_bytes: u64,
    /// Requests measured in the ping-pong.
    pub requests: u64,
    /// Median time to send one request and receive a one-byte reply,
    /// microseconds (one request in flight, `TCP_NODELAY`, both ends
    /// polling non-blocking sockets without sleeping, as kvxfer's do).
    pub p50_us: f64,
    /// Bandwidth of a stream of requests with no reply until the end,
    /// gigabytes (10^9 bytes) per second.
    pub stream_gb_per_s: f64,
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::backend(
        "BENCH",
        i64::from(e.raw_os_error().unwrap_or(-1)),
        &format!("TCP baseline: {what}: {e}"),
    )
}

/// Reads exactly `buf.len()` bytes from a non-blocking socket, polling.
fn spin_read(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` to a non-blocking socket, polling.
fn spin_write(s: &mut TcpStream, buf: &[u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match s.write(&buf[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Serves one connection: for each request of `n` bytes, a one-byte reply
/// (ping-pong), then reads the stream to its end and replies once.
fn serve(listener: TcpListener, n: usize, requests: u64) -> std::io::Result<()> {
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; n.min(16 << 20)];
    s.set_nonblocking(true)?;
    for _ in 0..requests {
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len());
            spin_read(&mut s, &mut buf[..k])?;
            left -= k;
        }
        spin_write(&mut s, &[1])?;
    }
    s.set_nonblocking(false)?;
    let mut read_exact = |s: &mut TcpStream, mut left: usize| -> std::io::Result<()> {
        while left > 0 {
            let k = left.min(buf.len());
            s.read_exact(&mut buf[..k])?;
            left -= k;
        }
        Ok(())
    };
    let mut total = [0u8; 8];
    s.read_exact(&mut total)?;
    read_exact(&mut s, u64::from_le_bytes(total) as usize)?;
    s.write_all(&[2])?;
    s.shutdown(Shutdown::Both)
}

/// Measures `requests` ping-pongs of `request_bytes` (after a few for
/// warm-up) and a stream of about `max(64 MiB, requests × request_bytes)`,
/// capped at 1 GiB, between two threads over loopback.
pub fn measure(request_bytes: u64, requests: u64) -> Result<TcpBaseline, Error> {
    let n = usize::try_from(request_bytes).map_err(|_| Error::InvalidRegion {
        addr: 0,
        len: request_bytes,
    })?;
    let warmup = 8;
    let requests = requests.clamp(16, 100_000);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| io_err("bind", e))?;
    let addr = listener.local_addr().map_err(|e| io_err("bind", e))?;
    let server = std::thread::spawn(move || serve(listener, n, warmup + requests));
    let mut s = TcpStream::connect(addr).map_err(|e| io_err("connect", e))?;
    s.set_nodelay(true).map_err(|e| io_err("TCP_NODELAY", e))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| io_err("timeout", e))?;
    let data = vec![0x5au8; n.min(16 << 20)];
    let send = |s: &mut TcpStream, mut left: usize| -> std::io::Result<()> {
        while left > 0 {
            let k = left.min(data.len());
            s.write_all(&data[..k])?;
            left -= k;
        }
        Ok(())
    };
    let mut lat = Vec::with_capacity(requests as usize);
    let mut reply = [0u8; 1];
    s.set_nonblocking(true)
        .map_err(|e| io_err("non-blocking", e))?;
    for i in 0..warmup + requests {
        let t = Instant::now();
        let mut left = n;
        while left > 0 {
            let k = left.min(data.len());
            spin_write(&mut s, &data[..k]).map_err(|e| io_err("send", e))?;
            left -= k;
        }
        spin_read(&mut s, &mut reply).map_err(|e| io_err("reply", e))?;
        if i >= warmup {
            lat.push(t.elapsed().as_nanos() as u64);
        }
    }
    s.set_nonblocking(false)
        .map_err(|e| io_err("blocking", e))?;
    lat.sort_unstable();
    let total = (requests.saturating_mul(request_bytes)).clamp(64 << 20, 1 << 30);
    let t = Instant::now();
    s.write_all(&total.to_le_bytes())
        .map_err(|e| io_err("send", e))?;
    send(&mut s, total as usize).map_err(|e| io_err("send", e))?;
    s.read_exact(&mut reply).map_err(|e| io_err("reply", e))?;
    let secs = t.elapsed().as_secs_f64();
    match server.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(io_err("server", e)),
        Err(_) => return Err(io_err("server", std::io::Error::other("panicked"))),
    }
    Ok(TcpBaseline {
        request_bytes,
        requests,
        p50_us: lat[lat.len() / 2] as f64 / 1000.0,
        stream_gb_per_s: total as f64 / secs / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_ping_pong_and_a_stream() {
        let b = measure(4096, 200).unwrap();
        assert_eq!((b.request_bytes, b.requests), (4096, 200));
        // Loopback on any machine: above 1 µs and below 35 ms a ping-pong
        // (Nagle's algorithm with delayed ACKs, i.e. no TCP_NODELAY, gives
        // 40 ms; a loaded 2-core machine gave up to 16 ms), above 10 MB/s a
        // stream.
        assert!(b.p50_us > 1.0 && b.p50_us < 35_000.0, "{b:?}");
        assert!(b.stream_gb_per_s > 0.01, "{b:?}");
    }
}
