//! Byte layouts of the CUDA-IPC transport address and packed keys.
//!
//! Both are fixed-size, little-endian, and decoded totally: any byte string
//! gives a value or an [`Error::BadMetadata`], never a panic.

use kvxfer_core::{Error, MemKind, MetaError};

/// Identifies this host for one boot (from `/proc/sys/kernel/random/boot_id`,
/// falling back to `/etc/machine-id`). CUDA IPC handles work only between
/// processes on the same host, so peers with another host id are refused.
pub fn host_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .or_else(|_| std::fs::read_to_string("/etc/machine-id"))
        .unwrap_or_default();
    parse_hex16(&text)
}

/// The first 32 hex digits of `text` (dashes and whitespace skipped), as 16
/// bytes; missing digits count as zero.
fn parse_hex16(text: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let digits = text.chars().filter_map(|c| c.to_digit(16)).take(32);
    for (i, d) in digits.enumerate() {
        out[i / 2] |= (d as u8) << if i % 2 == 0 { 4 } else { 0 };
    }
    out
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn take<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

fn check_len(b: &[u8], len: usize) -> Result<(), Error> {
    if b.len() < len {
        return Err(MetaError::Truncated {
            needed: len as u64,
            available: b.len() as u64,
        }
        .into());
    }
    if b.len() > len {
        return Err(MetaError::TrailingBytes {
            count: (b.len() - len) as u64,
        }
        .into());
    }
    Ok(())
}

/// Where a CUDA-IPC agent is: its host, process and transport instance.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct IpcAddress {
    /// See [`host_id`].
    pub host: [u8; 16],
    /// Process id.
    pub pid: u32,
    /// Transport instance within the process.
    pub instance: u32,
}

impl IpcAddress {
    /// Magic at the start of an encoded address.
    pub const MAGIC: [u8; 4] = *b"KVCI";
    /// Layout version.
    pub const VERSION: u8 = 1;
    /// Encoded length in bytes.
    pub const LEN: usize = 4 + 1 + 16 + 4 + 4;

    /// Writes the address into `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, Error> {
        if out.len() < Self::LEN {
            return Err(Error::BufferTooSmall {
                needed: Self::LEN as u64,
                available: out.len() as u64,
            });
        }
        out[0..4].copy_from_slice(&Self::MAGIC);
        out[4] = Self::VERSION;
        out[5..21].copy_from_slice(&self.host);
        out[21..25].copy_from_slice(&self.pid.to_le_bytes());
        out[25..29].copy_from_slice(&self.instance.to_le_bytes());
        Ok(Self::LEN)
    }

    /// Reads an address written by [`encode`](Self::encode).
    pub fn decode(b: &[u8]) -> Result<IpcAddress, Error> {
        if b.len() >= 4 && b[0..4] != Self::MAGIC {
            return Err(MetaError::BadMagic.into());
        }
        if b.len() >= 5 && b[4] != Self::VERSION {
            return Err(MetaError::UnsupportedVersion {
                found: b[4] as u16,
                supported: Self::VERSION as u16,
            }
            .into());
        }
        check_len(b, Self::LEN)?;
        Ok(IpcAddress {
            host: take(b, 5),
            pid: u32::from_le_bytes(take(b, 21)),
            instance: u32::from_le_bytes(take(b, 25)),
        })
    }

    /// Refuses a peer on another host: CUDA IPC handles cannot cross hosts.
    pub fn check_same_host(&self, local: &IpcAddress) -> Result<(), Error> {
        if self.host != local.host {
            return Err(Error::backend(
                crate::driver::BACKEND,
                crate::driver::INVALID_VALUE,
                &format!(
                    "peer (pid {}) is on host {}, this agent on {}: CUDA IPC needs both on one host",
                    self.pid,
                    &hex(&self.host)[..8],
                    &hex(&local.host)[..8]
                ),
            ));
        }
        Ok(())
    }

    /// The abstract Unix socket name on which this agent receives notifications.
    pub fn socket_name(&self) -> String {
        format!(
            "kvxfer-cuda-ipc.{}.{}.{}",
            hex(&self.host[..8]),
            self.pid,
            self.instance
        )
    }
}

/// The packed remote key of a registered VRAM region: the IPC handle of the
/// whole allocation holding it, where the region starts in that allocation,
/// the allocation's size, and the UUID of its GPU.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct VramKey {
    /// `CUipcMemHandle` of the allocation (from `cuIpcGetMemHandle` on its base).
    pub handle: [u8; 64],
    /// Region start minus allocation base.
    pub offset: u64,
    /// Allocation size (from `cuMemGetAddressRange`).
    pub alloc_len: u64,
    /// UUID of the GPU holding the allocation.
    pub gpu_uuid: [u8; 16],
}

impl VramKey {
    /// Encoded length of the body (after the kind tag), in bytes.
    pub const BODY_LEN: usize = 64 + 8 + 8 + 16;

    /// Checks that a region of `len` bytes at [`offset`](Self::offset) fits
    /// in the allocation.
    pub fn check_fits(&self, len: u64) -> Result<(), Error> {
        match self.offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.alloc_len => Ok(()),
            _ => Err(Error::backend(
                crate::driver::BACKEND,
                crate::driver::INVALID_VALUE,
                &format!(
                    "remote region of {len} bytes at offset {} leaves its allocation of {} bytes",
                    self.offset, self.alloc_len
                ),
            )),
        }
    }
}

/// The packed remote key of a registered DRAM region: where it lies in the
/// owner's address space. The owner's pid is in its [`IpcAddress`]; peers
/// reach the memory with cross-memory attach (`process_vm_readv` /
/// `process_vm_writev`), never outside `[addr, addr + len)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct DramKey {
    /// First byte, as a virtual address in the owning process.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DramKey {
    /// Encoded length of the body (after the kind tag), in bytes.
    pub const BODY_LEN: usize = 8 + 8;

    /// Checks that the region `[addr, +len)` a peer's metadata names lies
    /// inside the registered range this key describes.
    pub fn check_covers(&self, addr: u64, len: u64) -> Result<(), Error> {
        let key_end = self.addr.checked_add(self.len);
        let end = addr.checked_add(len);
        match (key_end, end) {
            (Some(ke), Some(e)) if len > 0 && addr >= self.addr && e <= ke => Ok(()),
            _ => Err(Error::backend(
                crate::driver::BACKEND,
                crate::driver::INVALID_VALUE,
                &format!(
                    "DRAM region [{addr:#x}, +{len}) is not inside its key's [{:#x}, +{})",
                    self.addr, self.len
                ),
            )),
        }
    }
}

/// The packed remote key of a CUDA-IPC region: a kind tag (the
/// [`MemKind::code`](kvxfer_core::MemKind::code), 0 for DRAM, 1 for VRAM)
/// followed by the body of that kind, little-endian.
///
/// | kind | bytes | layout |
/// |---|---|---|
/// | VRAM | 97 | tag 1, IPC handle (64), offset u64, allocation size u64, GPU UUID (16) |
/// | DRAM | 17 | tag 0, address u64, length u64 |
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum IpcKey {
    /// A VRAM region, reached through its allocation's CUDA IPC handle.
    Vram(VramKey),
    /// A DRAM region, reached through cross-memory attach.
    Dram(DramKey),
}

impl IpcKey {
    /// Longest encoded key, in bytes (a VRAM key).
    pub const MAX_LEN: usize = 1 + VramKey::BODY_LEN;
    /// Encoded length of a VRAM key.
    pub const VRAM_LEN: usize = 1 + VramKey::BODY_LEN;
    /// Encoded length of a DRAM key.
    pub const DRAM_LEN: usize = 1 + DramKey::BODY_LEN;

    /// The memory kind of the region.
    pub fn kind(&self) -> MemKind {
        match self {
            IpcKey::Vram(_) => MemKind::Vram,
            IpcKey::Dram(_) => MemKind::Dram,
        }
    }

    /// Encoded length of this key.
    pub fn encoded_len(&self) -> usize {
        match self {
            IpcKey::Vram(_) => Self::VRAM_LEN,
            IpcKey::Dram(_) => Self::DRAM_LEN,
        }
    }

    /// The VRAM body, if this is a VRAM key.
    pub fn vram(&self) -> Option<&VramKey> {
        match self {
            IpcKey::Vram(k) => Some(k),
            IpcKey::Dram(_) => None,
        }
    }

    /// The DRAM body, if this is a DRAM key.
    pub fn dram(&self) -> Option<&DramKey> {
        match self {
            IpcKey::Dram(k) => Some(k),
            IpcKey::Vram(_) => None,
        }
    }

    /// Writes the key into `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, Error> {
        let len = self.encoded_len();
        if out.len() < len {
            return Err(Error::BufferTooSmall {
                needed: len as u64,
                available: out.len() as u64,
            });
        }
        out[0] = self.kind().code();
        match self {
            IpcKey::Vram(k) => {
                out[1..65].copy_from_slice(&k.handle);
                out[65..73].copy_from_slice(&k.offset.to_le_bytes());
                out[73..81].copy_from_slice(&k.alloc_len.to_le_bytes());
                out[81..97].copy_from_slice(&k.gpu_uuid);
            }
            IpcKey::Dram(k) => {
                out[1..9].copy_from_slice(&k.addr.to_le_bytes());
                out[9..17].copy_from_slice(&k.len.to_le_bytes());
            }
        }
        Ok(len)
    }

    /// Reads a key written by [`encode`](Self::encode). An empty input is
    /// [`MetaError::Truncated`], an unknown tag [`MetaError::BadMemKind`], a
    /// body of the wrong length `Truncated` or [`MetaError::TrailingBytes`].
    pub fn decode(b: &[u8]) -> Result<IpcKey, Error> {
        let Some(&tag) = b.first() else {
            return Err(MetaError::Truncated {
                needed: 1,
                available: 0,
            }
            .into());
        };
        match MemKind::from_code(tag) {
            Some(MemKind::Vram) => {
                check_len(b, Self::VRAM_LEN)?;
                Ok(IpcKey::Vram(VramKey {
                    handle: take(b, 1),
                    offset: u64::from_le_bytes(take(b, 65)),
                    alloc_len: u64::from_le_bytes(take(b, 73)),
                    gpu_uuid: take(b, 81),
                }))
            }
            Some(MemKind::Dram) => {
                check_len(b, Self::DRAM_LEN)?;
                Ok(IpcKey::Dram(DramKey {
                    addr: u64::from_le_bytes(take(b, 1)),
                    len: u64::from_le_bytes(take(b, 9)),
                }))
            }
            None => Err(MetaError::BadMemKind { code: tag }.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_round_trips() {
        let a = IpcAddress {
            host: [7; 16],
            pid: 1234,
            instance: 5,
        };
        let mut buf = [0u8; 64];
        let n = a.encode(&mut buf).unwrap();
        assert_eq!(n, IpcAddress::LEN);
        assert_eq!(IpcAddress::decode(&buf[..n]).unwrap(), a);
    }

    #[test]
    fn address_errors_name_the_problem() {
        let a = IpcAddress {
            host: [7; 16],
            pid: 1,
            instance: 2,
        };
        let mut buf = [0u8; IpcAddress::LEN + 1];
        assert_eq!(
            a.encode(&mut buf[..10]),
            Err(Error::BufferTooSmall {
                needed: IpcAddress::LEN as u64,
                available: 10
            })
        );
        a.encode(&mut buf).unwrap();
        assert_eq!(
            IpcAddress::decode(&buf[..10]),
            Err(Error::BadMetadata(MetaError::Truncated {
                needed: IpcAddress::LEN as u64,
                available: 10
            }))
        );
        assert_eq!(
            IpcAddress::decode(&buf),
            Err(Error::BadMetadata(MetaError::TrailingBytes { count: 1 }))
        );
        let mut bad = buf;
        bad[0] = b'X';
        assert_eq!(
            IpcAddress::decode(&bad[..IpcAddress::LEN]),
            Err(Error::BadMetadata(MetaError::BadMagic))
        );
        let mut bad = buf;
        bad[4] = 9;
        assert_eq!(
            IpcAddress::decode(&bad[..IpcAddress::LEN]),
            Err(Error::BadMetadata(MetaError::UnsupportedVersion {
                found: 9,
                supported: 1
            }))
        );
        assert_eq!(
            IpcAddress::decode(&[]),
            Err(Error::BadMetadata(MetaError::Truncated {
                needed: IpcAddress::LEN as u64,
                available: 0
            }))
        );
    }

    #[test]
    fn other_host_is_refused() {
        let local = IpcAddress {
            host: [1; 16],
            pid: 10,
            instance: 0,
        };
        let same = IpcAddress {
            host: [1; 16],
            pid: 11,
            instance: 3,
        };
        let other = IpcAddress {
            host: [2; 16],
            pid: 11,
            instance: 3,
        };
        assert_eq!(same.check_same_host(&local), Ok(()));
        match other.check_same_host(&local) {
            Err(Error::Backend {
                backend: "CUDA_IPC",
                text,
                ..
            }) => {
                assert!(
                    text.contains("pid 11") && text.contains("one host"),
                    "{text}"
                )
            }
            r => panic!("expected a backend error, got {r:?}"),
        }
    }

    #[test]
    fn host_id_is_stable_and_not_zero() {
        assert_eq!(host_id(), host_id());
        assert_ne!(host_id(), [0; 16]);
        assert_eq!(
            parse_hex16("0123456789abcdef-0123456789ABCDEF\n")[..2],
            [0x01, 0x23]
        );
        assert_eq!(parse_hex16("ff")[0], 0xff);
    }

    fn vram_key() -> IpcKey {
        IpcKey::Vram(VramKey {
            handle: [3; 64],
            offset: 4096,
            alloc_len: 8192,
            gpu_uuid: [9; 16],
        })
    }

    fn dram_key() -> IpcKey {
        IpcKey::Dram(DramKey {
            addr: 0x7f00_1234_5000,
            len: 100,
        })
    }

    fn truncated(needed: usize, available: usize) -> Result<IpcKey, Error> {
        Err(Error::BadMetadata(MetaError::Truncated {
            needed: needed as u64,
            available: available as u64,
        }))
    }

    #[test]
    fn keys_round_trip_with_their_kind_tag() {
        for (k, len, tag) in [
            (vram_key(), IpcKey::VRAM_LEN, 1u8),
            (dram_key(), IpcKey::DRAM_LEN, 0u8),
        ] {
            let mut buf = [0xAAu8; IpcKey::MAX_LEN];
            assert_eq!(k.encode(&mut buf), Ok(len));
            assert_eq!(buf[0], tag);
            assert_eq!(IpcKey::decode(&buf[..len]), Ok(k));
            assert_eq!(k.encoded_len(), len);
        }
        assert_eq!((IpcKey::VRAM_LEN, IpcKey::DRAM_LEN), (97, 17));
        let mut buf = [0u8; IpcKey::DRAM_LEN];
        dram_key().encode(&mut buf).unwrap();
        assert_eq!(&buf[1..9], &0x7f00_1234_5000u64.to_le_bytes());
        assert_eq!(&buf[9..17], &100u64.to_le_bytes());
        assert_eq!(dram_key().kind(), MemKind::Dram);
        assert_eq!(vram_key().kind(), MemKind::Vram);
        assert!(dram_key().vram().is_none() && dram_key().dram().is_some());
        assert!(vram_key().dram().is_none() && vram_key().vram().is_some());
    }

    #[test]
    fn key_encode_into_a_short_buffer_names_both_lengths() {
        let mut buf = [0u8; IpcKey::MAX_LEN];
        assert_eq!(
            vram_key().encode(&mut buf[..96]),
            Err(Error::BufferTooSmall {
                needed: 97,
                available: 96
            })
        );
        assert_eq!(
            dram_key().encode(&mut buf[..16]),
            Err(Error::BufferTooSmall {
                needed: 17,
                available: 16
            })
        );
        assert_eq!(dram_key().encode(&mut buf[..17]), Ok(17));
    }

    #[test]
    fn key_decode_errors_are_exact() {
        let mut v = [0u8; IpcKey::MAX_LEN + 1];
        vram_key().encode(&mut v).unwrap();
        let mut d = [0u8; IpcKey::DRAM_LEN + 1];
        dram_key().encode(&mut d).unwrap();
        assert_eq!(IpcKey::decode(&[]), truncated(1, 0));
        assert_eq!(IpcKey::decode(&v[..1]), truncated(97, 1));
        assert_eq!(IpcKey::decode(&v[..96]), truncated(97, 96));
        assert_eq!(IpcKey::decode(&d[..1]), truncated(17, 1));
        assert_eq!(IpcKey::decode(&d[..16]), truncated(17, 16));
        assert_eq!(
            IpcKey::decode(&v),
            Err(Error::BadMetadata(MetaError::TrailingBytes { count: 1 }))
        );
        assert_eq!(
            IpcKey::decode(&d),
            Err(Error::BadMetadata(MetaError::TrailingBytes { count: 1 }))
        );
        // A DRAM tag on a VRAM-sized body: the length decides, not a guess.
        let mut mixed = v;
        mixed[0] = 0;
        assert_eq!(
            IpcKey::decode(&mixed[..97]),
            Err(Error::BadMetadata(MetaError::TrailingBytes { count: 80 }))
        );
        for tag in [2u8, 7, 0x80, 0xff] {
            let mut bad = v;
            bad[0] = tag;
            assert_eq!(
                IpcKey::decode(&bad[..97]),
                Err(Error::BadMetadata(MetaError::BadMemKind { code: tag }))
            );
            assert_eq!(
                IpcKey::decode(&[tag]),
                Err(Error::BadMetadata(MetaError::BadMemKind { code: tag }))
            );
        }
    }

    #[test]
    fn key_decode_is_total_on_garbage() {
        // Every prefix of every tag with pseudo-random bodies decodes to a
        // value or an error, never a panic, and round-trips when it decodes.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..=IpcKey::MAX_LEN + 3 {
            for _ in 0..64 {
                let mut b = vec![0u8; len];
                for byte in &mut b {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *byte = x as u8;
                }
                if let Some(first) = b.first_mut() {
                    *first %= 4;
                }
                if let Ok(k) = IpcKey::decode(&b) {
                    let mut out = [0u8; IpcKey::MAX_LEN];
                    let n = k.encode(&mut out).unwrap();
                    assert_eq!(&out[..n], &b[..]);
                }
            }
        }
    }

    #[test]
    fn vram_key_checks_bounds() {
        let IpcKey::Vram(k) = vram_key() else {
            unreachable!()
        };
        assert_eq!(k.check_fits(4096), Ok(()));
        match k.check_fits(4097) {
            Err(Error::Backend {
                backend: "CUDA_IPC",
                text,
                ..
            }) => assert_eq!(
                text.as_str(),
                "remote region of 4097 bytes at offset 4096 leaves its allocation of 8192 bytes"
            ),
            r => panic!("expected a bounds error, got {r:?}"),
        }
        assert!(matches!(k.check_fits(0), Err(Error::Backend { .. })));
        let huge = VramKey {
            offset: u64::MAX,
            ..k
        };
        assert!(matches!(huge.check_fits(2), Err(Error::Backend { .. })));
    }

    #[test]
    fn dram_key_covers_only_its_range() {
        let k = DramKey {
            addr: 0x1000,
            len: 100,
        };
        assert_eq!(k.check_covers(0x1000, 100), Ok(()));
        assert_eq!(k.check_covers(0x1010, 84), Ok(()));
        for (addr, len) in [
            (0x1000, 101),
            (0xfff, 10),
            (0x1000, 0),
            (0x1063, 2),
            (u64::MAX, 2),
        ] {
            match k.check_covers(addr, len) {
                Err(Error::Backend {
                    backend: "CUDA_IPC",
                    code: 1,
                    text,
                }) => assert_eq!(
                    text.as_str(),
                    format!(
                        "DRAM region [{addr:#x}, +{len}) is not inside its key's [0x1000, +100)"
                    )
                ),
                r => panic!("[{addr:#x}, +{len}) accepted: {r:?}"),
            }
        }
        let wraps = DramKey {
            addr: u64::MAX - 10,
            len: 100,
        };
        assert!(wraps.check_covers(u64::MAX - 10, 5).is_err());
    }
}
