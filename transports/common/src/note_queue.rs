//! A bounded queue of received notifications.

use std::collections::VecDeque;

use kvxfer_core::error::NAME_CAP;
use kvxfer_core::Error;

/// Bytes kept of a dropped notification: the frame's name length and the
/// longest name, enough for the engine to name the sender.
pub const LOST_HEAD: usize = 1 + NAME_CAP;
/// Dropped notifications whose senders are kept before further ones are
/// counted without a sender.
pub const LOST_KEPT: usize = 256;

/// A bounded queue of received notifications, filled as they arrive and
/// emptied by [`pop_into`](NoteQueue::pop_into) (a transport's
/// `poll_notification`). A message that finds the queue full, or is
/// longer than its limit, is dropped and reported — with its sender when
/// its first [`LOST_HEAD`] bytes are known — as
/// [`Error::NotificationDropped`], never lost in silence. Buffers are
/// allocated once and reused.
#[derive(Debug)]
pub struct NoteQueue {
    bufs: Vec<Vec<u8>>,
    head: usize,
    len: usize,
    max_len: usize,
    /// Dropped messages, each kept as its first [`LOST_HEAD`] bytes; at
    /// most [`LOST_KEPT`].
    lost: VecDeque<Vec<u8>>,
    /// Dropped messages beyond those kept, or whose bytes never arrived.
    lost_unknown: u64,
}

impl NoteQueue {
    /// A queue of `capacity` messages of at most `max_len` bytes each
    /// (capacity 0: one that keeps nothing and reports every message
    /// dropped).
    pub fn new(capacity: usize, max_len: usize) -> NoteQueue {
        NoteQueue {
            bufs: vec![Vec::new(); capacity],
            head: 0,
            len: 0,
            max_len,
            lost: VecDeque::new(),
            lost_unknown: 0,
        }
    }

    /// Queues a copy of `data`, or records it dropped when the queue is
    /// full or `data` is too long.
    pub fn push(&mut self, data: &[u8]) {
        if self.len == self.bufs.len() || data.len() > self.max_len {
            self.drop_one(data);
            return;
        }
        let i = (self.head + self.len) % self.bufs.len();
        let buf = &mut self.bufs[i];
        buf.clear();
        buf.extend_from_slice(data);
        self.len += 1;
    }

    /// Records a message that could not be kept; `data` is as much of it
    /// as is known (empty: nothing, reported without a sender).
    pub fn drop_one(&mut self, data: &[u8]) {
        if self.lost.len() < LOST_KEPT && !data.is_empty() {
            self.lost
                .push_back(data[..data.len().min(LOST_HEAD)].to_vec());
        } else {
            self.lost_unknown += 1;
        }
    }

    /// Messages queued (losses not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no message is queued (losses may still wait to be
    /// reported).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the next report: a loss first (its known start copied into
    /// `buf`, as [`Error::NotificationDropped`]), else the oldest message
    /// copied into `buf` with its length. A message longer than `buf` is
    /// [`Error::BufferTooSmall`] and stays queued. `None` when there is
    /// nothing to report.
    pub fn pop_into(&mut self, buf: &mut [u8]) -> Option<Result<usize, Error>> {
        if let Some(head) = self.lost.pop_front() {
            let n = head.len().min(buf.len());
            buf[..n].copy_from_slice(&head[..n]);
            return Some(Err(Error::NotificationDropped {
                len: n as u64,
                count: 1,
            }));
        }
        if self.lost_unknown > 0 {
            let count = std::mem::take(&mut self.lost_unknown);
            return Some(Err(Error::NotificationDropped { len: 0, count }));
        }
        if self.len == 0 {
            return None;
        }
        let msg = &self.bufs[self.head];
        if buf.len() < msg.len() {
            return Some(Err(Error::BufferTooSmall {
                needed: msg.len() as u64,
                available: buf.len() as u64,
            }));
        }
        let n = msg.len();
        buf[..n].copy_from_slice(msg);
        self.head = (self.head + 1) % self.bufs.len();
        self.len -= 1;
        Some(Ok(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pop(q: &mut NoteQueue, buf: &mut [u8]) -> Option<Result<Vec<u8>, Error>> {
        let r = q.pop_into(buf)?;
        Some(r.map(|n| buf[..n].to_vec()))
    }

    #[test]
    fn messages_come_out_in_order_and_losses_first_with_their_senders() {
        let mut q = NoteQueue::new(2, 8);
        let mut buf = [0u8; 128];
        assert_eq!(pop(&mut q, &mut buf), None);
        q.push(b"one");
        q.push(b"two");
        assert_eq!(q.len(), 2);
        q.push(b"\x03bobfull"); // the queue is full
        q.push(b"\x05alicetoo long"); // longer than 8 bytes
        assert_eq!(
            q.pop_into(&mut buf),
            Some(Err(Error::NotificationDropped { len: 8, count: 1 }))
        );
        assert_eq!(&buf[..8], b"\x03bobfull");
        assert_eq!(
            q.pop_into(&mut buf),
            Some(Err(Error::NotificationDropped { len: 14, count: 1 }))
        );
        assert_eq!(&buf[..14], b"\x05alicetoo long");
        assert_eq!(pop(&mut q, &mut buf), Some(Ok(b"one".to_vec())));
        // Too small a buffer: refused, and the message stays.
        assert_eq!(
            q.pop_into(&mut buf[..2]),
            Some(Err(Error::BufferTooSmall {
                needed: 3,
                available: 2
            }))
        );
        assert_eq!(pop(&mut q, &mut buf), Some(Ok(b"two".to_vec())));
        assert!(q.is_empty());
        // The ring wraps.
        for m in [&b"a"[..], b"b", b"c"] {
            q.push(m);
            assert_eq!(pop(&mut q, &mut buf), Some(Ok(m.to_vec())));
        }
        assert_eq!(pop(&mut q, &mut buf), None);
    }

    #[test]
    fn losses_beyond_those_kept_are_counted_without_a_sender() {
        let mut q = NoteQueue::new(0, 64);
        let long = [7u8; 2 * LOST_HEAD];
        for _ in 0..LOST_KEPT {
            q.push(&long);
        }
        q.push(b"x");
        q.drop_one(&[]);
        let mut buf = [0u8; 256];
        for _ in 0..LOST_KEPT {
            let r = q.pop_into(&mut buf);
            assert_eq!(
                r,
                Some(Err(Error::NotificationDropped {
                    len: LOST_HEAD as u64,
                    count: 1
                }))
            );
        }
        assert_eq!(
            q.pop_into(&mut buf),
            Some(Err(Error::NotificationDropped { len: 0, count: 2 }))
        );
        assert_eq!(q.pop_into(&mut buf), None);
    }
}
