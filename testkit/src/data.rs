//! Test data: seeded patterns, a checksum, hex, and byte comparison.

/// SplitMix64's output function.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 8 pattern bytes of `seed` from offset `word * 8` (zero for seed 0).
#[inline]
fn pattern_word(seed: u64, word: u64) -> [u8; 8] {
    if seed == 0 {
        return [0; 8];
    }
    splitmix64(seed ^ word.wrapping_mul(0xd6e8_feb8_6659_fd93)).to_le_bytes()
}

/// Byte `offset` of the pseudo-random pattern of `seed`. The pattern is
/// addressable at any offset, so both ends of a transfer agree on the
/// bytes of any part of it; seed 0 is all zeros.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    pattern_word(seed, offset / 8)[(offset % 8) as usize]
}

/// Fills `buf` with the pattern of `seed` from `offset` on.
pub fn fill_pattern(buf: &mut [u8], seed: u64, offset: u64) {
    let mut off = offset;
    let mut i = 0;
    while i < buf.len() {
        let w = pattern_word(seed, off / 8);
        let start = (off % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[start..start + n]);
        i += n;
        off += n as u64;
    }
}

/// Checks that `buf` holds the pattern of `seed` from `offset` on; `Err`
/// gives the index of the first differing byte, the byte found and the
/// byte expected.
pub fn check_pattern(buf: &[u8], seed: u64, offset: u64) -> Result<(), (usize, u8, u8)> {
    let mut off = offset;
    let mut i = 0;
    while i < buf.len() {
        let w = pattern_word(seed, off / 8);
        let start = (off % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        if let Some(k) = (0..n).find(|&k| buf[i + k] != w[start + k]) {
            return Err((i + k, buf[i + k], w[start + k]));
        }
        i += n;
        off += n as u64;
    }
    Ok(())
}

/// Fills `buf` with the pattern of `seed` (see [`pattern_byte`]).
pub fn fill(buf: &mut [u8], seed: u64) {
    fill_pattern(buf, seed, 0);
}

/// The first `len` bytes of the pattern of `seed` (see [`pattern_byte`]).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, seed);
    v
}

/// A 64-bit checksum over whole words, fast enough unoptimized for 64 MiB.
/// The length is part of it.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ bytes.len() as u64
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of hex text `s`; `None` if it is not hex of whole bytes.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// The first offset where `got` and `want` differ (the shorter length if
/// one is a prefix of the other); `None` if they are equal.
pub fn first_diff(got: &[u8], want: &[u8]) -> Option<usize> {
    if got == want {
        return None;
    }
    Some(
        got.iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len())),
    )
}

/// Panics, naming `what` and the first differing offset, unless `got` and
/// `want` are equal byte for byte (without printing megabytes).
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = first_diff(got, want) {
        let show = |b: &[u8]| hex(&b[at.min(b.len())..(at + 16).min(b.len())]);
        panic!(
            "{what}: {} bytes differ from the {} expected, first at offset {at} \
             (got {}…, want {}…)",
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_fill_and_hex_agree() {
        let p = pattern(7, 21);
        let mut f = [0u8; 21];
        fill(&mut f, 7);
        assert_eq!(p, f);
        assert_ne!(p, pattern(8, 21));
        assert_eq!(pattern(0, 9), [0; 9]);
        assert_eq!(unhex(&hex(&p)).as_deref(), Some(&p[..]));
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn pattern_is_addressable_at_any_offset() {
        let mut a = vec![0u8; 100];
        fill_pattern(&mut a, 7, 3);
        for (i, &b) in a.iter().enumerate() {
            assert_eq!(b, pattern_byte(7, 3 + i as u64));
        }
        assert_eq!(check_pattern(&a[10..], 7, 13), Ok(()));
        a[50] ^= 1;
        assert_eq!(check_pattern(&a, 7, 3), Err((50, a[50], a[50] ^ 1)));
        let mut z = vec![1u8; 9];
        fill_pattern(&mut z, 0, 5);
        assert_eq!(z, vec![0u8; 9]);
    }

    #[test]
    fn checksum_sees_every_byte_and_the_length() {
        let a = pattern(3, 1001);
        for i in [0, 7, 8, 1000] {
            let mut b = a.clone();
            b[i] ^= 1;
            assert_ne!(checksum(&a), checksum(&b), "byte {i}");
        }
        assert_ne!(checksum(&[0; 8]), checksum(&[0; 16]));
    }

    #[test]
    fn first_diff_finds_the_offset() {
        assert_eq!(first_diff(b"abc", b"abc"), None);
        assert_eq!(first_diff(b"abc", b"abd"), Some(2));
        assert_eq!(first_diff(b"ab", b"abc"), Some(2));
        let r = std::panic::catch_unwind(|| assert_same(b"abc", b"abd", "x"));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert_eq!(
            msg,
            "x: 3 bytes differ from the 3 expected, first at offset 2 (got 63…, want 64…)"
        );
    }
}
