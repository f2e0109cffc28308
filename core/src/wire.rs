//! The metadata wire format: what one agent tells another so that it can
//! reach it and name its memory.
//!
//! ```text
//! header (14 bytes)
//!   magic        4   b"KVXM"
//!   version      u16 = 1
//!   total_len    u32 whole blob, header included
//!   crc32        u32 CRC-32 (IEEE) of bytes 0..10 and 14..total_len
//! body
//!   name         u8 len, bytes (UTF-8, 1..=64)
//!   backend      u8 len, bytes (UTF-8, 1..=32)
//!   address      u16 len, bytes
//!   region count u16
//!   regions      addr u64, len u64, dev u32, kind u8, key_len u16, key
//! ```
//!
//! Everything is little-endian. Regions come in ascending address order and
//! neither overlap nor are empty. [`Metadata::decode`] checks every length,
//! text and region once, in time linear in the input, and never panics;
//! after it succeeds, [`Metadata::regions`] cannot fail. [`Encoder`] writes
//! a blob into the caller's buffer, letting the transport write its address
//! and keys in place.

use crate::error::{Error, MetaError, NAME_CAP};
use crate::mem::{MemKind, Region};

/// The first four bytes of every blob.
pub const MAGIC: [u8; 4] = *b"KVXM";
/// The format version this build writes and the newest it reads.
pub const VERSION: u16 = 1;
/// Bytes in the header.
pub const HEADER_LEN: usize = 14;
/// Longest backend name.
pub const BACKEND_CAP: usize = 32;
/// Bytes of a region record before its key.
pub const REGION_FIXED_LEN: usize = 8 + 8 + 4 + 1 + 2;

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// Running CRC-32 (IEEE 802.3, as zlib): start with `!0`, feed slices with
/// [`crc32_update`], finish with `!crc`.
pub fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC-32 (IEEE) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    !crc32_update(!0, bytes)
}

fn blob_crc(blob: &[u8]) -> u32 {
    let head = blob.get(..10).unwrap_or(&[]);
    let body = blob.get(HEADER_LEN..).unwrap_or(&[]);
    !crc32_update(crc32_update(!0, head), body)
}

/// A reader over a byte slice whose every read is checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MetaError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(MetaError::Truncated {
                needed: self.pos as u64 + n as u64,
                available: self.bytes.len() as u64,
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn array<const K: usize>(&mut self) -> Result<[u8; K], MetaError> {
        let mut a = [0u8; K];
        a.copy_from_slice(self.take(K)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, MetaError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, MetaError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, MetaError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, MetaError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn text(&mut self, len: usize, field: &'static str, max: usize) -> Result<&'a str, MetaError> {
        if len == 0 || len > max {
            return Err(MetaError::TooLarge {
                field,
                value: len as u64,
                max: max as u64,
            });
        }
        core::str::from_utf8(self.take(len)?).map_err(|_| MetaError::BadUtf8 { field })
    }
}

/// A remote region and its packed key, as read from a blob.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RegionRecord<'a> {
    /// The region, in the peer's address space.
    pub region: Region,
    /// The transport's packed key for it.
    pub key: &'a [u8],
}

/// A decoded metadata blob, borrowing from the bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Metadata<'a> {
    /// Format version of the blob.
    pub version: u16,
    /// The agent's name.
    pub name: &'a str,
    /// The backend that made it ("UCX", …).
    pub backend: &'a str,
    /// The transport's address of the agent.
    pub address: &'a [u8],
    /// Number of regions.
    pub region_count: u16,
    regions: &'a [u8],
}

fn read_region<'a>(r: &mut Reader<'a>, index: u32) -> Result<RegionRecord<'a>, MetaError> {
    let addr = r.u64()?;
    let len = r.u64()?;
    let dev = r.u32()?;
    let code = r.u8()?;
    let kind = MemKind::from_code(code).ok_or(MetaError::BadMemKind { code })?;
    let key_len = r.u16()? as usize;
    let key = r.take(key_len)?;
    let region = Region {
        addr,
        len,
        dev,
        kind,
    };
    if len == 0 || region.end().is_none() {
        return Err(MetaError::BadRegion { index });
    }
    Ok(RegionRecord { region, key })
}

impl<'a> Metadata<'a> {
    /// Decodes and checks a whole blob: header, checksum, texts, regions,
    /// and that nothing follows it.
    pub fn decode(blob: &'a [u8]) -> Result<Metadata<'a>, MetaError> {
        let mut r = Reader {
            bytes: blob,
            pos: 0,
        };
        if r.array::<4>()? != MAGIC {
            return Err(MetaError::BadMagic);
        }
        let version = r.u16()?;
        if version == 0 || version > VERSION {
            return Err(MetaError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let total = r.u32()? as u64;
        let stored = r.u32()?;
        let available = blob.len() as u64;
        if total < HEADER_LEN as u64 || total > available {
            return Err(MetaError::Truncated {
                needed: total.max(HEADER_LEN as u64),
                available: available.min(total),
            });
        }
        if total < available {
            return Err(MetaError::TrailingBytes {
                count: available - total,
            });
        }
        let computed = blob_crc(blob);
        if computed != stored {
            return Err(MetaError::ChecksumMismatch { stored, computed });
        }
        let name_len = r.u8()? as usize;
        let name = r.text(name_len, "agent name", NAME_CAP)?;
        let backend_len = r.u8()? as usize;
        let backend = r.text(backend_len, "backend name", BACKEND_CAP)?;
        let address_len = r.u16()? as usize;
        let address = r.take(address_len)?;
        let region_count = r.u16()?;
        let regions_start = r.pos;
        let mut prev_end: Option<u64> = None;
        for index in 0..region_count as u32 {
            let rec = read_region(&mut r, index)?;
            if prev_end.is_some_and(|e| rec.region.addr < e) {
                return Err(MetaError::BadRegion { index });
            }
            prev_end = rec.region.end();
        }
        if r.pos != blob.len() {
            return Err(MetaError::TrailingBytes {
                count: (blob.len() - r.pos) as u64,
            });
        }
        Ok(Metadata {
            version,
            name,
            backend,
            address,
            region_count,
            regions: &blob[regions_start..],
        })
    }

    /// The regions, in ascending address order.
    pub fn regions(&self) -> impl Iterator<Item = RegionRecord<'a>> + 'a {
        let mut r = Reader {
            bytes: self.regions,
            pos: 0,
        };
        (0..self.region_count as u32).map_while(move |i| read_region(&mut r, i).ok())
    }

    /// Encodes this value again (byte for byte what it was decoded from).
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, Error> {
        let address = self.address;
        let mut enc = Encoder::new(out, self.name, self.backend, |buf| copy_into(buf, address))?;
        for rec in self.regions() {
            enc.region(&rec.region, |buf| copy_into(buf, rec.key))?;
        }
        enc.finish()
    }
}

/// Copies `src` to the start of `buf`; returns its length.
pub fn copy_into(buf: &mut [u8], src: &[u8]) -> Result<usize, Error> {
    let available = buf.len() as u64;
    let dst = buf.get_mut(..src.len()).ok_or(Error::BufferTooSmall {
        needed: src.len() as u64,
        available,
    })?;
    dst.copy_from_slice(src);
    Ok(src.len())
}

/// Writes a blob into a caller's buffer.
pub struct Encoder<'b> {
    buf: &'b mut [u8],
    pos: usize,
    count_at: usize,
    count: u16,
    last_end: Option<u64>,
}

impl<'b> Encoder<'b> {
    /// Starts a blob for agent `name` of backend `backend`; `address`
    /// writes the transport address into the buffer it is given and returns
    /// its length.
    pub fn new(
        buf: &'b mut [u8],
        name: &str,
        backend: &str,
        address: impl FnOnce(&mut [u8]) -> Result<usize, Error>,
    ) -> Result<Encoder<'b>, Error> {
        if name.is_empty() || name.len() > NAME_CAP {
            return Err(Error::InvalidName {
                len: name.len() as u64,
            });
        }
        if backend.is_empty() || backend.len() > BACKEND_CAP {
            return Err(MetaError::TooLarge {
                field: "backend name",
                value: backend.len() as u64,
                max: BACKEND_CAP as u64,
            }
            .into());
        }
        let mut enc = Encoder {
            buf,
            pos: 0,
            count_at: 0,
            count: 0,
            last_end: None,
        };
        enc.put(&MAGIC)?;
        enc.put(&VERSION.to_le_bytes())?;
        enc.put(&[0u8; 8])?; // total length and checksum, set by `finish`
        enc.put(&[name.len() as u8])?;
        enc.put(name.as_bytes())?;
        enc.put(&[backend.len() as u8])?;
        enc.put(backend.as_bytes())?;
        enc.put_prefixed("transport address length", address)?;
        enc.count_at = enc.pos;
        enc.put(&[0, 0])?;
        Ok(enc)
    }

    fn room(&mut self, n: usize) -> Result<&mut [u8], Error> {
        let available = self.buf.len() as u64;
        self.buf
            .get_mut(self.pos..)
            .and_then(|b| b.get_mut(..n))
            .ok_or(Error::BufferTooSmall {
                needed: self.pos as u64 + n as u64,
                available,
            })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.room(bytes.len())?.copy_from_slice(bytes);
        self.pos += bytes.len();
        Ok(())
    }

    /// Appends what `f` writes, after its length as a little-endian `u16`;
    /// a longer write is refused as too large a `field`.
    fn put_prefixed(
        &mut self,
        field: &'static str,
        f: impl FnOnce(&mut [u8]) -> Result<usize, Error>,
    ) -> Result<(), Error> {
        let len_at = self.pos;
        self.put(&[0, 0])?;
        let n = self.write_with(f)?;
        let n16 = u16::try_from(n).map_err(|_| MetaError::TooLarge {
            field,
            value: n as u64,
            max: u16::MAX as u64,
        })?;
        self.buf[len_at..len_at + 2].copy_from_slice(&n16.to_le_bytes());
        Ok(())
    }

    fn write_with(
        &mut self,
        f: impl FnOnce(&mut [u8]) -> Result<usize, Error>,
    ) -> Result<usize, Error> {
        let pos = self.pos;
        let available = self.buf.len() as u64;
        let rest = self.buf.get_mut(pos..).unwrap_or(&mut []);
        let rest_len = rest.len();
        let n = f(rest).map_err(|e| match e {
            Error::BufferTooSmall { needed, .. } => Error::BufferTooSmall {
                needed: pos as u64 + needed,
                available,
            },
            e => e,
        })?;
        if n > rest_len {
            return Err(Error::BufferTooSmall {
                needed: pos as u64 + n as u64,
                available,
            });
        }
        self.pos += n;
        Ok(n)
    }

    /// Appends a region; `key` writes its packed key into the buffer it is
    /// given and returns its length. Regions must come in ascending address
    /// order, not overlap and not be empty.
    pub fn region(
        &mut self,
        region: &Region,
        key: impl FnOnce(&mut [u8]) -> Result<usize, Error>,
    ) -> Result<(), Error> {
        let bad = MetaError::BadRegion {
            index: self.count as u32,
        };
        let end = region.end().filter(|_| region.len > 0).ok_or(bad.clone())?;
        if self.last_end.is_some_and(|e| region.addr < e) {
            return Err(bad.into());
        }
        if self.count == u16::MAX {
            return Err(MetaError::TooLarge {
                field: "region count",
                value: 65536,
                max: u16::MAX as u64,
            }
            .into());
        }
        self.put(&region.addr.to_le_bytes())?;
        self.put(&region.len.to_le_bytes())?;
        self.put(&region.dev.to_le_bytes())?;
        self.put(&[region.kind.code()])?;
        self.put_prefixed("key length", key)?;
        self.count += 1;
        self.last_end = Some(end);
        Ok(())
    }

    /// Writes the region count, length and checksum; returns the blob's
    /// length.
    pub fn finish(self) -> Result<usize, Error> {
        let total = u32::try_from(self.pos).map_err(|_| MetaError::TooLarge {
            field: "metadata length",
            value: self.pos as u64,
            max: u32::MAX as u64,
        })?;
        self.buf[self.count_at..self.count_at + 2].copy_from_slice(&self.count.to_le_bytes());
        self.buf[6..10].copy_from_slice(&total.to_le_bytes());
        let crc = blob_crc(&self.buf[..self.pos]);
        self.buf[10..14].copy_from_slice(&crc.to_le_bytes());
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    extern crate std;
    use std::vec::Vec;

    fn sample(buf: &mut [u8]) -> usize {
        let mut e = Encoder::new(buf, "prefill-0", "UCX", |b| copy_into(b, b"addr-bytes")).unwrap();
        e.region(&Region::dram(0x1000, 0x100), |b| copy_into(b, b"k1"))
            .unwrap();
        e.region(&Region::vram(0x9000, 0x10, 2), |b| copy_into(b, b""))
            .unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn decodes_a_blob_written_from_the_format_description() {
        // Written by an independent encoder following the module docs.
        let blob = include_bytes!("../../fuzz/seeds/metadata_decode/two_regions");
        let m = Metadata::decode(blob).unwrap();
        assert_eq!(
            (m.name, m.backend, m.address),
            ("prefill-0", "UCX", &b"worker-address"[..])
        );
        let regions: Vec<_> = m.regions().collect();
        assert_eq!(
            regions,
            [
                RegionRecord {
                    region: Region::dram(0x1000, 0x100),
                    key: b"rkey"
                },
                RegionRecord {
                    region: Region::vram(0x9000, 0x10, 2),
                    key: b""
                }
            ]
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut buf = [0u8; 256];
        let n = sample(&mut buf);
        let m = Metadata::decode(&buf[..n]).unwrap();
        assert_eq!(
            (m.version, m.name, m.backend, m.address),
            (1, "prefill-0", "UCX", &b"addr-bytes"[..])
        );
        let regions: Vec<_> = m.regions().collect();
        assert_eq!(
            regions,
            [
                RegionRecord {
                    region: Region::dram(0x1000, 0x100),
                    key: b"k1"
                },
                RegionRecord {
                    region: Region::vram(0x9000, 0x10, 2),
                    key: b""
                }
            ]
        );
        let mut again = [0u8; 256];
        let k = m.encode(&mut again).unwrap();
        assert_eq!(&again[..k], &buf[..n]);
    }

    #[test]
    fn every_malformation_has_its_error() {
        let mut buf = [0u8; 256];
        let n = sample(&mut buf);
        let blob = &buf[..n];
        assert_eq!(
            Metadata::decode(&[]),
            Err(MetaError::Truncated {
                needed: 4,
                available: 0
            })
        );
        assert_eq!(
            Metadata::decode(&blob[..9]),
            Err(MetaError::Truncated {
                needed: 10,
                available: 9
            })
        );
        assert_eq!(
            Metadata::decode(&blob[..n - 1]),
            Err(MetaError::Truncated {
                needed: n as u64,
                available: n as u64 - 1
            })
        );
        let mut bad = Vec::from(blob);
        bad[0] = b'X';
        assert_eq!(Metadata::decode(&bad), Err(MetaError::BadMagic));
        let mut bad = Vec::from(blob);
        bad[4] = 2;
        assert_eq!(
            Metadata::decode(&bad),
            Err(MetaError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        let mut bad = Vec::from(blob);
        bad.push(0);
        assert_eq!(
            Metadata::decode(&bad),
            Err(MetaError::TrailingBytes { count: 1 })
        );
        let mut bad = Vec::from(blob);
        bad[20] ^= 1;
        assert!(matches!(
            Metadata::decode(&bad),
            Err(MetaError::ChecksumMismatch { .. })
        ));

        // Re-seal hand-edited blobs so that the checks after the checksum run.
        let reseal = |b: &mut Vec<u8>| {
            let total = b.len() as u32;
            b[6..10].copy_from_slice(&total.to_le_bytes());
            let crc = blob_crc(b);
            b[10..14].copy_from_slice(&crc.to_le_bytes());
        };
        let region0 = HEADER_LEN + 1 + 9 + 1 + 3 + 2 + 10 + 2;
        let mut bad = Vec::from(blob);
        bad[region0 + 20] = 7; // kind code
        reseal(&mut bad);
        assert_eq!(
            Metadata::decode(&bad),
            Err(MetaError::BadMemKind { code: 7 })
        );
        let mut bad = Vec::from(blob);
        bad[region0 + 8..region0 + 16].copy_from_slice(&0u64.to_le_bytes()); // empty region
        reseal(&mut bad);
        assert_eq!(
            Metadata::decode(&bad),
            Err(MetaError::BadRegion { index: 0 })
        );
        let mut bad = Vec::from(blob);
        let region1 = region0 + REGION_FIXED_LEN + 2;
        bad[region1..region1 + 8].copy_from_slice(&0x10ffu64.to_le_bytes()); // overlaps region 0
        reseal(&mut bad);
        assert_eq!(
            Metadata::decode(&bad),
            Err(MetaError::BadRegion { index: 1 })
        );
        let mut bad = Vec::from(blob);
        bad[HEADER_LEN + 1] = 0xff; // name not UTF-8
        reseal(&mut bad);
        assert_eq!(
            Metadata::decode(&bad),
            Err(MetaError::BadUtf8 {
                field: "agent name"
            })
        );
        let mut bad = Vec::from(blob);
        bad[HEADER_LEN] = 0; // empty name
        reseal(&mut bad);
        assert_eq!(
            Metadata::decode(&bad),
            Err(MetaError::TooLarge {
                field: "agent name",
                value: 0,
                max: NAME_CAP as u64
            })
        );
        let mut bad = Vec::from(blob);
        bad[region0 - 2..region0].copy_from_slice(&3u16.to_le_bytes()); // one more region than present
        reseal(&mut bad);
        assert!(matches!(
            Metadata::decode(&bad),
            Err(MetaError::Truncated { .. })
        ));
    }

    #[test]
    fn encoder_reports_small_buffers_and_bad_regions() {
        let mut small = [0u8; 20];
        assert!(matches!(
            Encoder::new(&mut small, "a-long-agent-name", "UCX", |b| copy_into(
                b, b"x"
            )),
            Err(Error::BufferTooSmall { available: 20, .. })
        ));
        let mut buf = [0u8; 128];
        let mut e = Encoder::new(&mut buf, "a", "UCX", |b| copy_into(b, b"")).unwrap();
        e.region(&Region::dram(100, 10), |_| Ok(0)).unwrap();
        assert_eq!(
            e.region(&Region::dram(105, 10), |_| Ok(0)),
            Err(MetaError::BadRegion { index: 1 }.into())
        );
        assert_eq!(
            e.region(&Region::dram(200, 0), |_| Ok(0)),
            Err(MetaError::BadRegion { index: 1 }.into())
        );
        assert_eq!(
            Encoder::new(&mut buf, "", "UCX", |_| Ok(0)).err(),
            Some(Error::InvalidName { len: 0 })
        );
    }

    proptest! {
        #[test]
        fn round_trip_any_valid_metadata(
            name in "[a-z0-9-]{1,64}",
            backend in prop::sample::select(&["UCX", "LIBFABRIC", "CUDA_IPC"][..]),
            address in proptest::collection::vec(any::<u8>(), 0..100),
            regions in proptest::collection::vec((1u64..1000, 1u64..1000, any::<u32>(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..10),
        ) {
            let mut buf = std::vec![0u8; 4096];
            let mut e = Encoder::new(&mut buf, &name, backend, |b| copy_into(b, &address)).unwrap();
            let mut addr = 0u64;
            let mut expect = Vec::new();
            for (gap, len, dev, vram, key) in &regions {
                addr += gap;
                let r = Region { addr, len: *len, dev: *dev, kind: if *vram { MemKind::Vram } else { MemKind::Dram } };
                e.region(&r, |b| copy_into(b, key)).unwrap();
                expect.push((r, key.clone()));
                addr += len;
            }
            let n = e.finish().unwrap();
            let m = Metadata::decode(&buf[..n]).unwrap();
            prop_assert_eq!(m.name, name.as_str());
            prop_assert_eq!(m.backend, backend);
            prop_assert_eq!(m.address, address.as_slice());
            let got: Vec<_> = m.regions().map(|r| (r.region, Vec::from(r.key))).collect();
            prop_assert_eq!(got, expect);
            let mut again = std::vec![0u8; 4096];
            let k = m.encode(&mut again).unwrap();
            prop_assert_eq!(&again[..k], &buf[..n]);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Metadata::decode(&bytes);
        }
    }
}
