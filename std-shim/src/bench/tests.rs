use super::*;

#[test]
fn sizes() {
    assert_eq!(parse_size("16KiB"), Ok(16384));
    assert_eq!(parse_size("16k"), Ok(16384));
    assert_eq!(parse_size("16KB"), Ok(16000));
    assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert!(parse_size("16XB")
        .unwrap_err()
        .contains("unknown unit \"xb\""));
    assert!(parse_size("KiB").is_err());
    assert!(parse_size("99999999999999G")
        .unwrap_err()
        .contains("overflows"));
    assert_eq!(format_size(16384), "16 KiB");
    assert_eq!(format_size(1000), "1000 B");
    assert_eq!(format_size(64 << 20), "64 MiB");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    assert!(parse_duration("5h").is_err());
    assert!(parse_duration("-1s").is_err());
}

#[test]
fn checksum_and_fill() {
    assert_eq!(checksum(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(checksum(b"a"), 0xaf63_dc4c_8601_ec8c);
    let mut a = vec![0u8; 1001];
    let mut b = vec![0u8; 1001];
    fill_random(&mut a, 7);
    fill_random(&mut b, 7);
    assert_eq!(a, b);
    fill_random(&mut b, 8);
    assert_ne!(checksum(&a), checksum(&b));
    assert!(a.iter().any(|&x| x != 0));
}

#[test]
fn percentiles() {
    let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
    assert_eq!(percentile(&v, 0.5), 51.0);
    assert_eq!(percentile(&v, 0.99), 99.0);
    assert_eq!(percentile(&[], 0.5), 0.0);
}
