//! Messages of the staging protocol: how a [`Staged`](crate::Staged)
//! transport asks a peer's `Staged` to move data into or out of the peer's
//! VRAM, and how the peer answers.
//!
//! They travel as notifications of the inner transport. Every message
//! starts with [`PREFIX`], whose first byte is zero: a notification framed
//! by the kvxfer engine starts with the sender's name length, which is
//! never zero, so the two cannot be confused. Integers are little-endian.
//!
//! ```text
//! request: PREFIX | version u8 | kind u8 (1 PULL, 2 PUSH) | 0 u8 | id u64
//!          | pool u64 | pool_len u64 | addr_len u16 | key_len u16
//!          | count u16 | addr | key | count × (vram u64, len u64, host u64)
//! answer:  PREFIX | version u8 | 3 u8 | status u8 (0 ok, 1 failed) | id u64
//!          | text_len u16 | text (UTF-8, why it failed)
//! ```
//!
//! * **PULL**: for each range, the peer READs `len` bytes at `host` (in
//!   the requester's bounce buffer `pool..pool + pool_len`, reached with
//!   `key` over a connection to `addr`) into its VRAM at `vram`.
//! * **PUSH**: for each range, the peer WRITEs `len` bytes of its VRAM at
//!   `vram` to `host`.
//!
//! Several ranges share one request so that many small blocks (KV-cache
//! pages) packed into one bounce buffer cost one round trip.
//! * The answer carries the request's `id` and is sent once the data is at
//!   its destination (or the request failed).
//!
//! Decoding is total: any byte string gives a message or an error naming
//! what is wrong, never a panic.

use kvxfer_core::Error;

/// First bytes of every staging message.
pub const PREFIX: [u8; 5] = *b"\0KXSG";
/// Protocol version this build speaks.
pub const VERSION: u8 = 2;
/// How the packed key of a VRAM region registered through `Staged` starts:
/// it tells a peer that requests for it are served, and in which protocol
/// version. The serving side's [`SECRET_LEN`]-byte secret follows.
pub const VRAM_KEY: [u8; 6] = [0, b'K', b'X', b'S', b'G', VERSION];
/// Bytes of the secret a VRAM key carries and every request repeats: only
/// peers that loaded the server's metadata (through the authenticated side
/// channel, or signed entries in etcd) know it.
pub const SECRET_LEN: usize = 16;

/// The packed key of VRAM registered through a `Staged` whose secret is
/// `secret`.
pub fn vram_key(secret: &[u8; SECRET_LEN]) -> [u8; VRAM_KEY.len() + SECRET_LEN] {
    let mut k = [0u8; VRAM_KEY.len() + SECRET_LEN];
    k[..VRAM_KEY.len()].copy_from_slice(&VRAM_KEY);
    k[VRAM_KEY.len()..].copy_from_slice(secret);
    k
}

/// The secret in a peer's VRAM key, if `key` is one of this version.
pub fn vram_secret(key: &[u8]) -> Option<[u8; SECRET_LEN]> {
    let secret = key.strip_prefix(VRAM_KEY.as_slice())?;
    secret.try_into().ok()
}

const KIND_PULL: u8 = 1;
const KIND_PUSH: u8 = 2;
const KIND_DONE: u8 = 3;
/// Bytes after the prefix of a request without its address, key and
/// ranges: version, kind, status, id, the server's secret, pool, pool
/// length and three counts.
pub const REQUEST_FIXED: usize = 3 + 8 + SECRET_LEN + 2 * 8 + 3 * 2;
/// Bytes per range of a request.
pub const RANGE_LEN: usize = 3 * 8;
/// Bytes after the prefix of an answer without its text.
const DONE_FIXED: usize = 3 + 8 + 2;
/// Longest failure text an answer carries.
pub const MAX_TEXT: usize = 256;

/// What a request asks the peer to do with its VRAM.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Fill VRAM from the requester's host memory.
    Pull,
    /// Copy VRAM to the requester's host memory.
    Push,
}

/// One range of a request: `len` bytes between the receiver's VRAM at
/// `vram` and the requester's host memory at `host`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// VRAM address at the receiver.
    pub vram: u64,
    /// Bytes to move.
    pub len: u64,
    /// Host address at the requester.
    pub host: u64,
}

/// A request to move data into or out of the receiver's VRAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// Direction of the move.
    pub dir: Direction,
    /// Identifies the request in the answer.
    pub id: u64,
    /// What to move; at most 65535 ranges.
    pub ranges: Vec<Range>,
    /// The requester's registered bounce buffer holding every `host` range.
    pub pool: u64,
    /// Length of that pool.
    pub pool_len: u64,
    /// The requester's transport address.
    pub addr: &'a [u8],
    /// The inner transport's packed key of the pool.
    pub key: &'a [u8],
    /// The receiver's secret, from its VRAM key.
    pub secret: [u8; SECRET_LEN],
}

/// A decoded staging message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A request to serve.
    Request(Request<'a>),
    /// The answer to request `id`: `Ok` or why it failed.
    Done {
        /// The request's id.
        id: u64,
        /// `Err` with the peer's reason when the request failed.
        result: Result<(), &'a str>,
    },
}

/// Whether a notification is a staging message (rather than a user's).
pub fn is_staging(msg: &[u8]) -> bool {
    msg.starts_with(&PREFIX)
}

fn malformed(what: &str) -> Error {
    Error::backend(
        "STAGING",
        crate::driver::INVALID_VALUE,
        &format!("malformed staging message: {what}"),
    )
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(malformed(&format!(
                "{} bytes end inside {what} (needs {} more)",
                self.buf.len(),
                self.at + n - self.buf.len()
            )));
        };
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, Error> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Error> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Decodes a staging message.
pub fn decode(msg: &[u8]) -> Result<Message<'_>, Error> {
    let mut r = Reader { buf: msg, at: 0 };
    if r.take(PREFIX.len(), "the prefix")? != PREFIX {
        return Err(malformed("wrong prefix"));
    }
    let version = r.u8("the version")?;
    if version != VERSION {
        return Err(malformed(&format!(
            "version {version}, this build speaks {VERSION}"
        )));
    }
    let kind = r.u8("the kind")?;
    let status = r.u8("the status")?;
    let id = r.u64("the id")?;
    let msg = match kind {
        KIND_PULL | KIND_PUSH => {
            if status != 0 {
                return Err(malformed(&format!("status {status} in a request")));
            }
            let mut secret = [0u8; SECRET_LEN];
            secret.copy_from_slice(r.take(SECRET_LEN, "the secret")?);
            let pool = r.u64("the pool address")?;
            let pool_len = r.u64("the pool length")?;
            let addr_len = r.u16("the address length")?;
            let key_len = r.u16("the key length")?;
            let count = r.u16("the range count")?;
            let addr = r.take(usize::from(addr_len), "the address")?;
            let key = r.take(usize::from(key_len), "the key")?;
            // Checked before allocating: the ranges must all be there.
            let left = r.buf.len() - r.at;
            let need = usize::from(count) * RANGE_LEN;
            if left < need {
                return Err(malformed(&format!(
                    "{count} ranges need {need} bytes, {left} left"
                )));
            }
            let mut ranges = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                ranges.push(Range {
                    vram: r.u64("a range")?,
                    len: r.u64("a range")?,
                    host: r.u64("a range")?,
                });
            }
            Message::Request(Request {
                dir: if kind == KIND_PULL {
                    Direction::Pull
                } else {
                    Direction::Push
                },
                id,
                ranges,
                pool,
                pool_len,
                addr,
                key,
                secret,
            })
        }
        KIND_DONE => {
            let text_len = r.u16("the text length")?;
            let text = r.take(usize::from(text_len), "the text")?;
            let result = match status {
                0 if !text.is_empty() => {
                    return Err(malformed(&format!(
                        "a successful answer carries {} bytes of text",
                        text.len()
                    )))
                }
                0 => Ok(()),
                1 => Err(std::str::from_utf8(text)
                    .map_err(|_| malformed("failure text is not UTF-8"))?),
                s => return Err(malformed(&format!("status {s}"))),
            };
            Message::Done { id, result }
        }
        k => return Err(malformed(&format!("kind {k}"))),
    };
    if r.at != r.buf.len() {
        return Err(malformed(&format!(
            "{} bytes after the message",
            r.buf.len() - r.at
        )));
    }
    Ok(msg)
}

fn header(out: &mut Vec<u8>, kind: u8, status: u8, id: u64) {
    out.clear();
    out.extend_from_slice(&PREFIX);
    out.push(VERSION);
    out.push(kind);
    out.push(status);
    out.extend_from_slice(&id.to_le_bytes());
}

/// Encodes `req` into `out` (cleared first). Fails when the address or the
/// key is longer than 65535 bytes.
pub fn encode_request(req: &Request<'_>, out: &mut Vec<u8>) -> Result<(), Error> {
    let too_long = |what: &str, n: usize| {
        Error::backend(
            "STAGING",
            crate::driver::INVALID_VALUE,
            &format!("{what} of {n} bytes does not fit a staging request (at most 65535)"),
        )
    };
    let addr_len =
        u16::try_from(req.addr.len()).map_err(|_| too_long("address", req.addr.len()))?;
    let key_len = u16::try_from(req.key.len()).map_err(|_| too_long("key", req.key.len()))?;
    let count = u16::try_from(req.ranges.len())
        .map_err(|_| too_long("range list", req.ranges.len() * RANGE_LEN))?;
    let kind = match req.dir {
        Direction::Pull => KIND_PULL,
        Direction::Push => KIND_PUSH,
    };
    header(out, kind, 0, req.id);
    out.extend_from_slice(&req.secret);
    out.extend_from_slice(&req.pool.to_le_bytes());
    out.extend_from_slice(&req.pool_len.to_le_bytes());
    out.extend_from_slice(&addr_len.to_le_bytes());
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(req.addr);
    out.extend_from_slice(req.key);
    for g in &req.ranges {
        for v in [g.vram, g.len, g.host] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    debug_assert_eq!(
        out.len(),
        request_len(req.addr.len(), req.key.len(), req.ranges.len())
    );
    Ok(())
}

/// Bytes of a request with an address, key and range list of these lengths.
pub fn request_len(addr: usize, key: usize, ranges: usize) -> usize {
    PREFIX.len() + REQUEST_FIXED + addr + key + ranges * RANGE_LEN
}

/// Encodes the answer to request `id` into `out` (cleared first); a
/// failure text is cut to [`MAX_TEXT`] bytes at a character boundary.
pub fn encode_done(id: u64, result: Result<(), &str>, out: &mut Vec<u8>) {
    let (status, text) = match result {
        Ok(()) => (0, ""),
        Err(t) => {
            let mut end = t.len().min(MAX_TEXT);
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            (1, &t[..end])
        }
    };
    header(out, KIND_DONE, status, id);
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    debug_assert_eq!(out.len(), PREFIX.len() + DONE_FIXED + text.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request<'static> {
        Request {
            dir: Direction::Push,
            id: 0x0102_0304_0506_0708,
            ranges: vec![
                Range {
                    vram: 0x7f00_0000_1000,
                    len: 16 << 10,
                    host: 0x5500_0000_0000,
                },
                Range {
                    vram: 0x7f00_0000_9000,
                    len: 4096,
                    host: 0x5500_0000_4000,
                },
            ],
            pool: 0x5500_0000_0000,
            pool_len: 16 << 20,
            addr: b"address bytes",
            key: b"key",
            secret: *b"sixteen byte key",
        }
    }

    fn text(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn vram_keys_carry_the_secret() {
        let k = vram_key(b"sixteen byte key");
        assert_eq!(&k[..6], &VRAM_KEY);
        assert_eq!(vram_secret(&k), Some(*b"sixteen byte key"));
        assert_eq!(vram_secret(&k[..21]), None);
        assert_eq!(vram_secret(&VRAM_KEY), None);
        let mut v1 = k;
        v1[5] = 1;
        assert_eq!(vram_secret(&v1), None);
    }

    #[test]
    fn request_round_trips() {
        let mut out = Vec::new();
        for dir in [Direction::Pull, Direction::Push] {
            let req = Request { dir, ..request() };
            encode_request(&req, &mut out).unwrap();
            assert!(is_staging(&out));
            assert_eq!(out.len(), 5 + REQUEST_FIXED + 13 + 3 + 2 * 24);
            assert_eq!(out.len(), request_len(13, 3, 2));
            assert_eq!(decode(&out).unwrap(), Message::Request(req));
        }
    }

    #[test]
    fn answers_round_trip_and_long_texts_are_cut_at_a_char_boundary() {
        let mut out = Vec::new();
        encode_done(7, Ok(()), &mut out);
        assert_eq!(
            decode(&out).unwrap(),
            Message::Done {
                id: 7,
                result: Ok(())
            }
        );
        encode_done(8, Err("VRAM 0x10 is not registered"), &mut out);
        assert_eq!(
            decode(&out).unwrap(),
            Message::Done {
                id: 8,
                result: Err("VRAM 0x10 is not registered")
            }
        );
        // 255 ASCII bytes then a 2-byte character: cut before it.
        let long = format!("{}é{}", "a".repeat(255), "b".repeat(100));
        encode_done(9, Err(&long), &mut out);
        let Message::Done { result: Err(t), .. } = decode(&out).unwrap() else {
            panic!("not a failed answer")
        };
        assert_eq!(t, "a".repeat(255));
    }

    #[test]
    fn every_truncation_is_refused_with_the_missing_part() {
        let mut out = Vec::new();
        encode_request(&request(), &mut out).unwrap();
        for n in 0..out.len() {
            let e = decode(&out[..n]).unwrap_err();
            assert!(
                text(e.clone()).contains("malformed staging message"),
                "{n}: {e}"
            );
        }
        assert_eq!(
            text(decode(&out[..5 + REQUEST_FIXED]).unwrap_err()),
            "STAGING error 1: malformed staging message: 54 bytes end inside the address (needs 13 more)"
        );
        assert_eq!(
            text(decode(&out[..out.len() - 1]).unwrap_err()),
            "STAGING error 1: malformed staging message: 2 ranges need 48 bytes, 47 left"
        );
        // A count far beyond the message is refused before allocating.
        let mut huge = out.clone();
        huge[52..54].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            text(decode(&huge).unwrap_err()),
            "STAGING error 1: malformed staging message: 65535 ranges need 1572840 bytes, 48 left"
        );
    }

    #[test]
    fn wrong_prefix_version_kind_status_and_trailing_bytes_are_refused() {
        let mut out = Vec::new();
        encode_done(1, Ok(()), &mut out);
        let with = |i: usize, v: u8| {
            let mut m = out.clone();
            m[i] = v;
            decode(&m).map(|_| ()).map_err(text)
        };
        let err = |s: &str| Err(format!("STAGING error 1: malformed staging message: {s}"));
        assert_eq!(with(1, b'Y'), err("wrong prefix"));
        assert_eq!(with(5, 1), err("version 1, this build speaks 2"));
        assert_eq!(with(6, 9), err("kind 9"));
        assert_eq!(with(7, 4), err("status 4"));
        let mut req = Vec::new();
        encode_request(&request(), &mut req).unwrap();
        req[7] = 1;
        assert_eq!(
            decode(&req).map(|_| ()).map_err(text),
            err("status 1 in a request")
        );
        let mut m = out.clone();
        m.push(0);
        assert_eq!(
            decode(&m).map(|_| ()).map_err(text),
            err("1 bytes after the message")
        );
        let mut m = out.clone();
        m[7] = 1;
        m.truncate(16);
        m.extend_from_slice(&[1, 0, 0xff]);
        assert_eq!(
            decode(&m).map(|_| ()).map_err(text),
            err("failure text is not UTF-8")
        );
        // A success carries no text (found by the cuda_wire_decode fuzz
        // target: the text was ignored, so two encodings meant one answer).
        let mut m = out.clone();
        m.truncate(16);
        m.extend_from_slice(&[2, 0, b'o', b'k']);
        assert_eq!(
            decode(&m).map(|_| ()).map_err(text),
            err("a successful answer carries 2 bytes of text")
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..200 {
            let mut m = PREFIX.to_vec();
            m.push(VERSION);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                m.push(x as u8);
            }
            let _ = decode(&m);
        }
    }

    #[test]
    fn vram_key_and_user_frames_are_not_staging_messages() {
        // A frame from the engine starts with the sender's name length.
        assert!(!is_staging(b"\x05alicehello"));
        assert!(!is_staging(b""));
        assert!(is_staging(&VRAM_KEY));
    }
}
