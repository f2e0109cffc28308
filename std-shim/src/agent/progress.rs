//! The progress thread: polls while work is in flight, sleeps on the transport's descriptor when idle.

use super::*;

/// Longest the idle progress thread sleeps on a transport's wake-up
/// descriptor before polling anyway.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// How long the progress thread polls without sleeping after something
/// woke it.
const HOT_AFTER_WAKE: Duration = Duration::from_millis(1);

pub(super) fn progress_loop(inner: Arc<AgentInner>) {
    // Spin while transfers are in flight (yielding the lock and the CPU
    // between polls); back off to `progress_idle_sleep` when idle.
    // A target serving a peer's RMA in software (UCX over tcp) has no
    // transfer of its own in flight: the transport's activity count keeps
    // it polling while that traffic lasts.
    let max_sleep = inner.cfg.progress_idle_sleep;
    let mut idle_rounds: u32 = 0;
    let mut last_activity: u64 = 0;
    // After a wake-up, poll without sleeping for a while: a peer's next
    // request (RMA served in software raises no completion here) is
    // likely to follow within microseconds.
    let mut hot_until = StdInstant::now();
    while !inner.closed.load(Ordering::Acquire) {
        let (finished, inflight, activity, far, notes) = {
            let mut st = inner.lock();
            let (f, i) = st.progress_counting();
            let notes = !st.notifs.is_empty() || !st.lost.is_empty() || !st.refused.is_empty();
            (f, i, st.activity(), st.far_peers(), notes)
        };
        // With no idle sleep configured, poll without sleeping only while
        // a peer may need this agent's progress; peers on this host moved
        // by cross-memory attach never do.
        let max_sleep = if max_sleep.is_zero() && far == 0 {
            crate::config::DEFAULT_PROGRESS_IDLE_SLEEP
        } else {
            max_sleep
        };
        let active = activity != last_activity;
        last_activity = activity;
        if finished > 0 || notes {
            inner.done.notify_all();
        }
        if finished > 0 || inflight > 0 || active {
            idle_rounds = 0;
            std::thread::yield_now();
        } else {
            idle_rounds = idle_rounds.saturating_add(1);
            if idle_rounds < 64 || StdInstant::now() < hot_until {
                std::thread::yield_now();
                continue;
            }
            // Idle: sleep on the transport's wake-up descriptor where it has
            // one (and on the agent's own wake-ups), else back off.
            // Marked before the transport is armed, under the lock posts
            // take: a post after it sees the mark and wakes the thread; one
            // before it left work that keeps the transport from arming.
            let (wake, limit) = {
                let mut st = inner.lock();
                inner.sleeping.store(true, Ordering::SeqCst);
                (st.arm(), st.poll_timeout())
            };
            if !matches!(wake, kvxfer_core::Wake::Armed(_)) {
                inner.sleeping.store(false, Ordering::SeqCst);
            }
            match wake {
                kvxfer_core::Wake::Armed(fd) => {
                    // Awake by the engine's next deadline, at the latest.
                    let wait = limit.map_or(IDLE_WAIT, |l| l.min(IDLE_WAIT));
                    let woken = inner.waker.wait(fd, wait);
                    inner.sleeping.store(false, Ordering::SeqCst);
                    if woken {
                        hot_until = StdInstant::now() + HOT_AFTER_WAKE;
                    }
                }
                kvxfer_core::Wake::Busy => std::thread::yield_now(),
                kvxfer_core::Wake::Unsupported => {
                    let step = Duration::from_micros(u64::from(idle_rounds - 63).min(1000) * 10);
                    let step = limit.map_or(step, |l| l.min(step));
                    std::thread::sleep(step.min(max_sleep));
                }
            }
        }
    }
}
