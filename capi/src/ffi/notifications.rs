//! Notifications outside transfers.

use super::*;

/// Sends `msg` (`msg_len` bytes) to `peer`, outside any transfer.
///
/// # Safety
///
/// `agent` is NULL or live; `peer` NULL or NUL-terminated; `msg` NULL
/// (only with `msg_len` 0) or readable for `msg_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_notify(
    agent: *const kvxfer_agent,
    peer: *const c_char,
    msg: *const u8,
    msg_len: usize,
) -> kvxfer_status {
    guard("kvxfer_notify", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        // SAFETY: per this function's contract.
        let peer = unsafe { text(peer, "peer") }?;
        // SAFETY: per this function's contract.
        let msg = unsafe { slice(msg, msg_len, "msg") }?;
        a.agent.notify(peer, msg)?;
        Ok(())
    })
}

/// Takes every notification received so far and hands each to `cb`, by
/// sender, oldest first. Lost notifications fail with
/// `KVXFER_ERR_NOTIFICATIONS_LOST` naming the sender (messages then stay
/// for the next call).
///
/// # Safety
///
/// `agent` is NULL or live; `cb` is a function as described at
/// [`kvxfer_notification_fn`]; `ctx` is passed to it unchanged.
#[no_mangle]
pub unsafe extern "C" fn kvxfer_take_notifications(
    agent: *const kvxfer_agent,
    cb: kvxfer_notification_fn,
    ctx: *mut c_void,
) -> kvxfer_status {
    guard("kvxfer_take_notifications", || {
        // SAFETY: per this function's contract.
        let a = unsafe { deref(agent, "agent") }?;
        let cb = cb.ok_or(Fail::Null("cb"))?;
        for (peer, msgs) in a.agent.take_notifications()? {
            for m in msgs {
                // SAFETY: `cb` is a valid function per the contract; the
                // pointers are valid for the lengths given during the call.
                unsafe { cb(ctx, peer.as_ptr().cast(), peer.len(), m.as_ptr(), m.len()) };
            }
        }
        Ok(())
    })
}
