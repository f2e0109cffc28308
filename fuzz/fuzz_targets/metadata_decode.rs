//! Decoding any bytes gives a value or an error, never a panic; a decoded
//! value re-encodes to exactly the bytes it came from.
#![no_main]

use kvxfer_core::wire::Metadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = Metadata::decode(data) {
        assert_eq!(meta.regions().count(), meta.region_count as usize);
        let mut out = vec![0u8; data.len()];
        let n = meta.encode(&mut out).expect("a decoded blob re-encodes");
        assert_eq!(&out[..n], data);
        assert!(meta.encode(&mut out[..n - 1]).is_err());
    }
});
