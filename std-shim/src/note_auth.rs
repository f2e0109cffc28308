//! Notifications authenticated with the agent key ([`AgentConfig::auth_key`],
//! `KVXFER_AUTH_KEY`).
//!
//! The transports carry a notification's sender name inside the message,
//! so without a key any process that reaches an agent's transport could
//! claim any name. With a key, every notification this agent sends (alone
//! or after a transfer) is sealed: `KVXN`, a 16-byte HMAC-SHA256 tag over
//! the sender's name, the receiver's name and the payload, then the
//! payload. A receiver with the key delivers only notifications whose tag
//! checks; the others are refused and reported with the name they claimed
//! ([`Error::NotificationsRefused`]). What this proves is that the sender
//! holds the key: agents sharing one key trust each other's names.
//!
//! [`AgentConfig::auth_key`]: crate::AgentConfig::auth_key
//! [`Error::NotificationsRefused`]: kvxfer_core::Error::NotificationsRefused

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a sealed notification starts with.
const MAGIC: &[u8; 4] = b"KVXN";
/// Bytes of the tag kept.
const TAG_LEN: usize = 16;
/// Bytes a seal adds to a notification.
#[cfg(test)]
const OVERHEAD: usize = MAGIC.len() + TAG_LEN;

/// The notification key of agent `me`, derived from the agent key.
#[derive(Clone)]
pub(crate) struct NoteKey {
    mac: HmacSha256,
    me: String,
}

impl NoteKey {
    /// The notification key derived from `auth_key`, for agent `me`.
    pub(crate) fn new(auth_key: &[u8], me: &str) -> NoteKey {
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(auth_key).expect("HMAC takes keys of any length");
        m.update(b"kvxfer notification key v1");
        let derived = m.finalize().into_bytes();
        NoteKey {
            mac: <HmacSha256 as Mac>::new_from_slice(&derived)
                .expect("HMAC takes keys of any length"),
            me: me.to_string(),
        }
    }

    /// The MAC of `msg` from `from` to `to`, not yet finalized.
    fn mac(&self, from: &str, to: &str, msg: &[u8]) -> HmacSha256 {
        let mut m = self.mac.clone();
        m.update(&(from.len() as u32).to_le_bytes());
        m.update(from.as_bytes());
        m.update(&(to.len() as u32).to_le_bytes());
        m.update(to.as_bytes());
        m.update(msg);
        m
    }

    fn tag(&self, from: &str, to: &str, msg: &[u8]) -> [u8; TAG_LEN] {
        let full = self.mac(from, to, msg).finalize().into_bytes();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full[..TAG_LEN]);
        t
    }

    /// Writes `msg` from this agent to `to`, sealed, into `out` (cleared
    /// first; its capacity is reused).
    pub(crate) fn seal(&self, to: &str, msg: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.tag(&self.me, to, msg));
        out.extend_from_slice(msg);
    }

    /// The payload of `sealed` if it is a notification from `from` to this
    /// agent sealed with this key.
    pub(crate) fn open<'a>(&self, from: &str, sealed: &'a [u8]) -> Option<&'a [u8]> {
        let to = self.me.as_str();
        let rest = sealed.strip_prefix(MAGIC.as_slice())?;
        if rest.len() < TAG_LEN {
            return None;
        }
        let (tag, msg) = rest.split_at(TAG_LEN);
        self.mac(from, to, msg).verify_truncated_left(tag).ok()?;
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_notifications_open_only_as_sent() {
        let (a, b, c) = (
            NoteKey::new(b"secret", "a"),
            NoteKey::new(b"secret", "b"),
            NoteKey::new(b"secret", "c"),
        );
        let mut sealed = Vec::new();
        a.seal("b", b"layer 7 ready", &mut sealed);
        assert_eq!(sealed.len(), OVERHEAD + 13);
        assert_eq!(b.open("a", &sealed), Some(&b"layer 7 ready"[..]));
        // Another claimed sender or receiver, another key, a changed byte,
        // a plain message: refused.
        assert_eq!(b.open("c", &sealed), None);
        assert_eq!(c.open("a", &sealed), None);
        assert_eq!(NoteKey::new(b"other", "b").open("a", &sealed), None);
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(b.open("a", &bad), None);
        assert_eq!(b.open("a", b"layer 7 ready"), None);
        assert_eq!(b.open("a", &sealed[..OVERHEAD - 1]), None);
        // Names are length-prefixed: "ab" to "c" is not "a" to "bc".
        NoteKey::new(b"secret", "ab").seal("c", b"", &mut sealed);
        assert_eq!(NoteKey::new(b"secret", "bc").open("a", &sealed), None);
        assert!(NoteKey::new(b"secret", "c").open("ab", &sealed).is_some());
    }
}
