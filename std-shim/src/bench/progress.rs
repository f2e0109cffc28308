//! The progress bar and the stop on end of standard input.

use super::*;

/// The progress bar of a run: shown on standard error once the run has
/// taken two seconds, only if standard error is a terminal and
/// [`BenchOptions::progress_bar`] is set; otherwise nothing is printed.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(super) struct ProgressBar {
    enabled: bool,
    /// Measured requests wanted, or the duration wanted in milliseconds.
    total: u64,
    by_time: Option<Duration>,
    started: Instant,
    #[cfg(feature = "cli")]
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressBar {
    pub(super) fn new(opts: &BenchOptions, iters: u64) -> ProgressBar {
        use std::io::IsTerminal;
        ProgressBar {
            enabled: cfg!(feature = "cli") && opts.progress_bar && std::io::stderr().is_terminal(),
            total: match opts.duration {
                Some(d) => d.as_millis() as u64,
                None => iters,
            },
            by_time: opts.duration,
            started: Instant::now(),
            #[cfg(feature = "cli")]
            bar: None,
        }
    }

    /// Records `measured` requests done, measuring since `t0`.
    #[cfg_attr(not(feature = "cli"), allow(unused_variables))]
    pub(super) fn tick(&mut self, measured: u64, t0: Instant) {
        #[cfg(feature = "cli")]
        if self.enabled && measured % 16 == 0 {
            if self.bar.is_none() {
                if self.started.elapsed() < Duration::from_secs(2) {
                    return;
                }
                let style = indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                let bar = indicatif::ProgressBar::new(self.total).with_style(style);
                bar.set_message(if self.by_time.is_some() {
                    "ms"
                } else {
                    "requests"
                });
                self.bar = Some(bar);
            }
            if let Some(b) = &self.bar {
                let pos = match self.by_time {
                    Some(_) => t0.elapsed().as_millis() as u64,
                    None => measured,
                };
                b.set_position(pos.min(self.total));
            }
        }
    }

    pub(super) fn finish(&mut self) {
        #[cfg(feature = "cli")]
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Sets `flag` when standard input reaches its end (the parent closed it
/// or went away).
pub fn stop_on_stdin_eof(flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        flag.store(true, Ordering::Release);
    });
}
