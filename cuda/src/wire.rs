//! Byte layouts of the CUDA-IPC transport address and packed keys.
//!
//! Both are fixed-size, little-endian, and decoded totally: any byte string
//! gives a value or an [`Error::BadMetadata`], never a panic.

use kvxfer_core::{Error, MetaError};

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
pub struct IpcKey {
    /// `CUipcMemHandle` of the allocation (from `cuIpcGetMemHandle` on its base).
    pub handle: [u8; 64],
    /// Region start minus allocation base.
    pub offset: u64,
    /// Allocation size (from `cuMemGetAddressRange`).
    pub alloc_len: u64,
    /// UUID of the GPU holding the allocation.
    pub gpu_uuid: [u8; 16],
}

impl IpcKey {
    /// Encoded length in bytes.
    pub const LEN: usize = 64 + 8 + 8 + 16;

    /// Writes the key into `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, Error> {
        if out.len() < Self::LEN {
            return Err(Error::BufferTooSmall {
                needed: Self::LEN as u64,
                available: out.len() as u64,
            });
        }
        out[0..64].copy_from_slice(&self.handle);
        out[64..72].copy_from_slice(&self.offset.to_le_bytes());
        out[72..80].copy_from_slice(&self.alloc_len.to_le_bytes());
        out[80..96].copy_from_slice(&self.gpu_uuid);
        Ok(Self::LEN)
    }

    /// Reads a key written by [`encode`](Self::encode).
    pub fn decode(b: &[u8]) -> Result<IpcKey, Error> {
        check_len(b, Self::LEN)?;
        Ok(IpcKey {
            handle: take(b, 0),
            offset: u64::from_le_bytes(take(b, 64)),
            alloc_len: u64::from_le_bytes(take(b, 72)),
            gpu_uuid: take(b, 80),
        })
    }

    /// Checks that a region of `len` bytes at [`offset`](Self::offset) fits
    /// in the allocation; `index` is for the error text.
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

    #[test]
    fn key_round_trips_and_checks_bounds() {
        let k = IpcKey {
            handle: [3; 64],
            offset: 4096,
            alloc_len: 8192,
            gpu_uuid: [9; 16],
        };
        let mut buf = [0u8; IpcKey::LEN];
        assert_eq!(k.encode(&mut buf), Ok(IpcKey::LEN));
        assert_eq!(IpcKey::decode(&buf), Ok(k));
        assert_eq!(
            IpcKey::decode(&buf[..95]),
            Err(Error::BadMetadata(MetaError::Truncated {
                needed: 96,
                available: 95
            }))
        );
        assert_eq!(k.check_fits(4096), Ok(()));
        assert!(matches!(
            k.check_fits(4097),
            Err(Error::Backend {
                backend: "CUDA_IPC",
                ..
            })
        ));
        assert!(matches!(k.check_fits(0), Err(Error::Backend { .. })));
        let huge = IpcKey {
            offset: u64::MAX,
            ..k
        };
        assert!(matches!(huge.check_fits(2), Err(Error::Backend { .. })));
    }
}
