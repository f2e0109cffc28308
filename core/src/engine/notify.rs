//! Notifications: framing with the sender's name, sending, receiving.

use super::*;

impl<'a, T: Transport> Engine<'a, T> {
    /// Frames `payload` with this agent's name into note slot `n`. The
    /// frame must fit both the slot and the transport's notification limit;
    /// when not even the frame around an empty payload fits, the error
    /// gives the framed length and the limit.
    pub(super) fn frame(&mut self, n: u32, payload: &[u8]) -> Result<(), Error> {
        let limit = self.note_len.min(self.caps.max_notification as usize);
        let overhead = 1 + self.name.len();
        if overhead > limit {
            return Err(Error::NotificationTooLong {
                len: (overhead + payload.len()) as u64,
                max: limit as u64,
            });
        }
        let max = limit - overhead;
        if payload.len() > max {
            return Err(Error::NotificationTooLong {
                len: payload.len() as u64,
                max: max as u64,
            });
        }
        let at = n as usize * self.note_len;
        let out = &mut self.notes[at..at + overhead + payload.len()];
        out[0] = self.name.len() as u8;
        out[1..overhead].copy_from_slice(self.name.as_bytes());
        out[overhead..].copy_from_slice(payload);
        self.note_slots[n as usize].len = (overhead + payload.len()) as u32;
        Ok(())
    }

    /// Takes a notification slot and frames `payload` into it.
    pub(super) fn take_note(&mut self, payload: &[u8]) -> Result<u32, Error> {
        let n = self.free_note;
        if n == NIL {
            return Err(Error::capacity(
                "notifications",
                self.note_slots.len(),
                "notifications",
            ));
        }
        self.free_note = self.note_slots[n as usize].next_free;
        if let Err(e) = self.frame(n, payload) {
            self.put_note(n);
            return Err(e);
        }
        Ok(n)
    }

    pub(super) fn put_note(&mut self, n: u32) {
        if let Some(s) = self.note_slots.get_mut(n as usize) {
            s.next_free = self.free_note;
            self.free_note = n;
        }
    }

    /// Sends a notification to a peer. Its frame is built in a free
    /// notification slot, given back at once.
    pub fn notify(&mut self, peer: &str, msg: &[u8]) -> Result<(), Error> {
        let p = self.peer_index(peer)?;
        let n = self.take_note(msg)?;
        let slot = &self.peers[p];
        let result = match slot.peer.as_ref() {
            Some(endpoint) => {
                let at = n as usize * self.note_len;
                let len = self.note_slots[n as usize].len as usize;
                self.transport
                    .send_notification(endpoint, &self.notes[at..at + len])
                    .map_err(|e| with_peer(e, &slot.name))
            }
            None => Err(Error::unknown_peer(peer)),
        };
        self.put_note(n);
        result
    }

    /// Takes one received notification; its payload goes to the start of
    /// `buf`. `buf` must also hold the frame around it while it is read (1
    /// byte plus the sender's name): a buffer of payload + 65 bytes always
    /// does. A message that does not fit yields [`Error::BufferTooSmall`]
    /// and stays queued.
    pub fn poll_notification(&mut self, buf: &mut [u8]) -> Option<Result<Notification, Error>> {
        let n = match self.transport.poll_notification(buf)? {
            Ok(n) => n,
            Err(Error::NotificationDropped { len, count }) => {
                let head = buf.get(..len as usize).unwrap_or(&[]);
                let peer = sender(head).map(bounded).unwrap_or_default();
                return Some(Err(Error::NotificationsLost { peer, count }));
            }
            Err(e) => return Some(Err(e)),
        };
        let malformed = Error::MalformedNotification { len: n as u64 };
        let Some(frame) = buf.get(..n) else {
            return Some(Err(malformed));
        };
        let Some(name) = sender(frame) else {
            return Some(Err(malformed));
        };
        let name_len = name.len();
        let peer: Name = bounded(name);
        buf.copy_within(1 + name_len..n, 0);
        Some(Ok(Notification {
            peer,
            len: n - 1 - name_len,
        }))
    }
}
