//! CUDA_IPC addresses and keys and staging messages decoded from arbitrary
//! bytes: decoding never panics, and whatever decodes encodes back to the
//! very same bytes (one encoding per value, so a peer cannot smuggle
//! meaning past the checks in bytes the encoder would not write).
#![no_main]

use kvxfer_cuda::staging_wire::{self, Message};
use kvxfer_cuda::wire::{IpcAddress, IpcKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; IpcKey::MAX_LEN + IpcAddress::LEN];
    if let Ok(a) = IpcAddress::decode(data) {
        let n = a.encode(&mut out).expect("room for an address");
        assert_eq!(&out[..n], data, "address re-encodes differently");
    }
    if let Ok(k) = IpcKey::decode(data) {
        let n = k.encode(&mut out).expect("room for a key");
        assert_eq!(&out[..n], data, "key re-encodes differently");
    }
    let mut msg = Vec::new();
    match staging_wire::decode(data) {
        Ok(Message::Request(r)) => {
            staging_wire::encode_request(&r, &mut msg).expect("a decoded request encodes");
            assert_eq!(msg, data, "request re-encodes differently");
        }
        Ok(Message::Done { id, result }) => {
            // The encoder cuts failure texts to MAX_TEXT bytes.
            if result.err().map_or(0, str::len) <= staging_wire::MAX_TEXT {
                staging_wire::encode_done(id, result, &mut msg);
                assert_eq!(msg, data, "answer re-encodes differently");
            }
        }
        Err(_) => {}
    }
});
