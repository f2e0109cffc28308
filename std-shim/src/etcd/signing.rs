//! Entries signed with the side-channel key: `KVXS`, an HMAC-SHA256 tag over the name and the metadata, then the metadata.

use super::*;

/// Start of a signed entry: the magic, then an HMAC-SHA256 tag, then the
/// metadata.
const SIGNED: &[u8; 4] = b"KVXS";
const TAG_LEN: usize = 32;

fn metadata_mac(key: &[u8], name: &str, meta: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    m.update(b"kvxfer etcd metadata v1\0");
    m.update(name.as_bytes());
    m.update(b"\0");
    m.update(meta);
    m
}

/// The entry to publish for `name`'s metadata: signed when there is a key.
pub(super) fn seal(key: Option<&[u8]>, name: &str, meta: &[u8]) -> Vec<u8> {
    use hmac::Mac;
    match key {
        None => meta.to_vec(),
        Some(key) => {
            let tag = metadata_mac(key, name, meta).finalize().into_bytes();
            let mut v = Vec::with_capacity(SIGNED.len() + TAG_LEN + meta.len());
            v.extend_from_slice(SIGNED);
            v.extend_from_slice(&tag);
            v.extend_from_slice(meta);
            v
        }
    }
}

/// The metadata in `name`'s entry. With a key, only an entry signed with
/// it is accepted; without one, a signed entry's metadata is taken as is.
pub(super) fn open<'v>(key: Option<&[u8]>, name: &str, value: &'v [u8]) -> Result<&'v [u8], Error> {
    use hmac::Mac;
    let signed = value.starts_with(SIGNED) && value.len() >= SIGNED.len() + TAG_LEN;
    let (tag, meta) = if signed {
        value[SIGNED.len()..].split_at(TAG_LEN)
    } else {
        (&[][..], value)
    };
    match key {
        None => Ok(meta),
        Some(_) if !signed => Err(etcd_err(
            -1,
            &format!("entry of {name:?} is not signed, and this agent has an auth key"),
        )),
        Some(key) => match metadata_mac(key, name, meta).verify_slice(tag) {
            Ok(()) => Ok(meta),
            Err(_) => Err(etcd_err(
                -1,
                &format!("entry of {name:?} is signed with another key (or was altered)"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_sealed_and_opened_with_the_key() {
        let meta = b"some metadata bytes".as_slice();
        let sealed = seal(Some(b"k1"), "peer", meta);
        assert!(sealed.starts_with(SIGNED));
        assert_eq!(open(Some(b"k1"), "peer", &sealed), Ok(meta));
        assert_eq!(
            open(None, "peer", &sealed),
            Ok(meta),
            "keyless readers take it"
        );
        let why = |r: Result<&[u8], Error>| match r {
            Err(Error::Backend { text, .. }) => text.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(why(open(Some(b"k2"), "peer", &sealed)).contains("signed with another key"));
        // Under another name, or altered by one bit anywhere: refused.
        assert!(why(open(Some(b"k1"), "other", &sealed)).contains("or was altered"));
        for at in [4, 20, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(
                why(open(Some(b"k1"), "peer", &bad)).contains("or was altered"),
                "{at}"
            );
        }
        assert!(why(open(Some(b"k1"), "peer", meta)).contains("is not signed"));
        assert_eq!(seal(None, "peer", meta), meta);
    }
}
