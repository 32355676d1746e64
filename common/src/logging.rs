//! A minimal `log` backend: one line per record on stderr, prefixed with the program name.
//! The level comes from `SPLITVMM_LOG` (error, warn, info, debug, trace; default info).
//!
//! Warnings are rate-limited per call site: a hostile guest or frontend can make a backend
//! warn once per request, and a log that grows by millions of lines takes the host's disk
//! down with it. Each site may log `SPLITVMM_LOG_BURST` lines (default [`DEFAULT_BURST`]; 0 means
//! no limit) per [`WINDOW`]; the first line it logs after that says how many were suppressed.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines one call site may log per window unless `SPLITVMM_LOG_BURST` says otherwise.
pub const DEFAULT_BURST: u32 = 10;
/// The rate limiter's window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Per call site counts over the current window.
#[derive(Debug)]
pub struct RateLimiter {
    /// Lines per site per window; 0: unlimited.
    burst: u32,
    sites: HashMap<(&'static str, u32), Site>,
}

#[derive(Debug)]
struct Site {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines from the same site were dropped since the last one logged.
    Log {
        suppressed: u64,
    },
    Drop,
}

impl RateLimiter {
    pub fn new(burst: u32) -> Self {
        RateLimiter {
            burst,
            sites: HashMap::new(),
        }
    }

    /// Decides about one line from `site` (file, line) at `now`.
    pub fn check(&mut self, site: (&'static str, u32), now: Instant) -> Verdict {
        if self.burst == 0 {
            return Verdict::Log { suppressed: 0 };
        }
        let entry = self.sites.entry(site).or_insert(Site {
            window_start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(entry.window_start) >= WINDOW {
            entry.window_start = now;
            entry.logged = 0;
        }
        if entry.logged >= self.burst {
            entry.suppressed += 1;
            return Verdict::Drop;
        }
        entry.logged += 1;
        Verdict::Log {
            suppressed: std::mem::take(&mut entry.suppressed),
        }
    }
}

struct StderrLogger {
    program: &'static str,
    limiter: Mutex<RateLimiter>,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut suppressed = 0;
        if record.level() == log::Level::Warn {
            let site = (
                record.file_static().unwrap_or("?"),
                record.line().unwrap_or(0),
            );
            let verdict = self
                .limiter
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .check(site, Instant::now());
            match verdict {
                Verdict::Drop => return,
                Verdict::Log { suppressed: n } => suppressed = n,
            }
        }
        let level = record.level().as_str().to_ascii_lowercase();
        let mut out = std::io::stderr().lock();
        // Logging must never take the process down, so a failed write is dropped.
        if suppressed > 0 {
            let _ = writeln!(
                out,
                "{}: {level}: ({suppressed} similar lines suppressed)",
                self.program
            );
        }
        let _ = writeln!(out, "{}: {level}: {}", self.program, record.args());
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls are ignored.
pub fn init(program: &'static str) {
    let level = std::env::var("SPLITVMM_LOG")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let burst = std::env::var("SPLITVMM_LOG_BURST")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(DEFAULT_BURST);
    let logger = StderrLogger {
        program,
        limiter: Mutex::new(RateLimiter::new(burst)),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_logs_a_burst_per_window_then_reports_what_it_dropped() {
        let mut limiter = RateLimiter::new(DEFAULT_BURST);
        let start = Instant::now();
        for _ in 0..DEFAULT_BURST {
            assert_eq!(
                limiter.check(("a.rs", 1), start),
                Verdict::Log { suppressed: 0 }
            );
        }
        for _ in 0..25 {
            assert_eq!(limiter.check(("a.rs", 1), start), Verdict::Drop);
        }
        // Another site is not affected.
        assert_eq!(
            limiter.check(("a.rs", 2), start),
            Verdict::Log { suppressed: 0 }
        );
        let later = start + WINDOW;
        assert_eq!(
            limiter.check(("a.rs", 1), later),
            Verdict::Log { suppressed: 25 }
        );
        assert_eq!(
            limiter.check(("a.rs", 1), later),
            Verdict::Log { suppressed: 0 }
        );
    }

    #[test]
    fn a_burst_of_zero_means_no_limit() {
        let mut limiter = RateLimiter::new(0);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(
                limiter.check(("a.rs", 1), now),
                Verdict::Log { suppressed: 0 }
            );
        }
    }
}
