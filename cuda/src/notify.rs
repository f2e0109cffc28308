//! The per-host notification channel of the CUDA-IPC transport.
//!
//! CUDA IPC moves data but carries no messages, so each transport binds a
//! Unix datagram socket in the abstract namespace under a name derived from
//! its [`IpcAddress`](crate::wire::IpcAddress). Datagrams keep message
//! boundaries and order between one sender and one receiver; the socket is
//! non-blocking on both sides. Abstract names vanish with the socket, so
//! nothing is left in the file system.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use kvxfer_core::Error;

use crate::driver::BACKEND;

/// A bound, non-blocking datagram socket that sends notifications to peers
/// and queues the ones received.
#[derive(Debug)]
pub struct NotifyChannel {
    sock: UnixDatagram,
    max: usize,
    buf: Vec<u8>,
    /// A received message that did not fit the caller's buffer.
    held: Option<usize>,
}

/// The socket address of the channel bound under `name`.
pub fn channel_addr(name: &str) -> Result<SocketAddr, Error> {
    SocketAddr::from_abstract_name(name.as_bytes()).map_err(|e| {
        Error::backend(
            BACKEND,
            e.raw_os_error().unwrap_or(0) as i64,
            &format!("socket name {name:?}: {e}"),
        )
    })
}

impl NotifyChannel {
    /// Binds the channel `name`; messages longer than `max` bytes are refused.
    pub fn bind(name: &str, max: usize) -> Result<NotifyChannel, Error> {
        let io_err = |e: io::Error| {
            Error::backend(
                BACKEND,
                e.raw_os_error().unwrap_or(0) as i64,
                &format!("binding notification socket {name:?}: {e}"),
            )
        };
        let sock = UnixDatagram::bind_addr(&channel_addr(name)?).map_err(io_err)?;
        sock.set_nonblocking(true).map_err(io_err)?;
        Ok(NotifyChannel {
            sock,
            max,
            buf: vec![0; max + 1],
            held: None,
        })
    }

    /// Longest message accepted.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Sends `msg` to the channel at `to`. `Ok(false)` means the receiver's
    /// queue is full: try again later.
    pub fn send(&self, to: &SocketAddr, msg: &[u8]) -> Result<bool, io::Error> {
        match self.sock.send_to_addr(msg, to) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Copies one received message into `out`, if any. A message longer
    /// than `out` gives [`Error::BufferTooSmall`] and stays queued.
    pub fn recv(&mut self, out: &mut [u8]) -> Option<Result<usize, Error>> {
        let len = match self.held {
            Some(len) => len,
            None => match self.sock.recv(&mut self.buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return None,
                Err(e) => {
                    return Some(Err(Error::backend(
                        BACKEND,
                        e.raw_os_error().unwrap_or(0) as i64,
                        &format!("receiving a notification: {e}"),
                    )))
                }
            },
        };
        if len > self.max {
            // Only a sender that ignores the limit gets here; drop the message.
            self.held = None;
            return Some(Err(Error::NotificationTooLong {
                len: len as u64,
                max: self.max as u64,
            }));
        }
        if len > out.len() {
            self.held = Some(len);
            return Some(Err(Error::BufferTooSmall {
                needed: len as u64,
                available: out.len() as u64,
            }));
        }
        self.held = None;
        out[..len].copy_from_slice(&self.buf[..len]);
        Some(Ok(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(tag: &str) -> String {
        format!("kvxfer-cuda-ipc-test.{}.{tag}", std::process::id())
    }

    #[test]
    fn messages_arrive_in_order_and_too_small_buffers_keep_them() {
        let a = NotifyChannel::bind(&name("a"), 64).unwrap();
        let mut b = NotifyChannel::bind(&name("b"), 64).unwrap();
        let to_b = channel_addr(&name("b")).unwrap();
        let mut out = [0u8; 64];
        assert!(b.recv(&mut out).is_none());
        assert!(a.send(&to_b, b"first message").unwrap());
        assert!(a.send(&to_b, b"second").unwrap());
        let mut small = [0u8; 4];
        assert_eq!(
            b.recv(&mut small),
            Some(Err(Error::BufferTooSmall {
                needed: 13,
                available: 4
            }))
        );
        assert_eq!(b.recv(&mut out), Some(Ok(13)));
        assert_eq!(&out[..13], b"first message");
        assert_eq!(b.recv(&mut out), Some(Ok(6)));
        assert_eq!(&out[..6], b"second");
        assert!(b.recv(&mut out).is_none());
    }

    #[test]
    fn oversized_messages_are_dropped_with_an_error() {
        let a = NotifyChannel::bind(&name("c"), 8).unwrap();
        let mut b = NotifyChannel::bind(&name("d"), 8).unwrap();
        a.send(&channel_addr(&name("d")).unwrap(), &[1u8; 20])
            .unwrap();
        let mut out = [0u8; 64];
        assert_eq!(
            b.recv(&mut out),
            Some(Err(Error::NotificationTooLong { len: 9, max: 8 }))
        );
        assert!(b.recv(&mut out).is_none());
    }

    #[test]
    fn sending_to_nobody_fails_and_names_are_exclusive() {
        let a = NotifyChannel::bind(&name("e"), 8).unwrap();
        let err = a
            .send(&channel_addr(&name("nobody")).unwrap(), b"x")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        match NotifyChannel::bind(&name("e"), 8) {
            Err(Error::Backend {
                backend: "CUDA_IPC",
                code,
                ..
            }) => assert_eq!(code, 98), // EADDRINUSE
            r => panic!("expected EADDRINUSE, got {r:?}"),
        }
    }
}
