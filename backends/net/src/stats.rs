//! Per-queue-pair counters (daemon-wide, across sessions) and the rate limit on drop logging:
//! a guest that sends garbage in a loop must not flood the log, and must never crash us.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one drop line per pair per this interval; the rest are counted.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What happened to frames on one queue pair.
#[derive(Debug, Default)]
pub struct PairStats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// TX chains that were not a valid frame (bad descriptors, bad header, too short).
    pub tx_malformed: AtomicU64,
    /// TX frames longer than the MTU allows (without GSO) or than any frame can be.
    pub tx_oversized: AtomicU64,
    /// TX frames dropped because the tap is gone or refused them.
    pub tx_dropped: AtomicU64,
    /// RX chains that were not usable buffers (readable or unmapped descriptors).
    pub rx_bad_chains: AtomicU64,
    /// RX frames dropped: larger than the buffers offered, or the session went away.
    pub rx_dropped: AtomicU64,
    log: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    last: Option<Instant>,
    suppressed: u64,
}

/// A plain copy of the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_malformed: u64,
    pub tx_oversized: u64,
    pub tx_dropped: u64,
    pub rx_bad_chains: u64,
    pub rx_dropped: u64,
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tx {} frames {} B, rx {} frames {} B, dropped: tx_malformed={} tx_oversized={} \
             tx_dropped={} rx_bad_chains={} rx_dropped={}",
            self.tx_frames,
            self.tx_bytes,
            self.rx_frames,
            self.rx_bytes,
            self.tx_malformed,
            self.tx_oversized,
            self.tx_dropped,
            self.rx_bad_chains,
            self.rx_dropped
        )
    }
}

pub fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl PairStats {
    pub fn snapshot(&self) -> Snapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            tx_frames: g(&self.tx_frames),
            tx_bytes: g(&self.tx_bytes),
            rx_frames: g(&self.rx_frames),
            rx_bytes: g(&self.rx_bytes),
            tx_malformed: g(&self.tx_malformed),
            tx_oversized: g(&self.tx_oversized),
            tx_dropped: g(&self.tx_dropped),
            rx_bad_chains: g(&self.rx_bad_chains),
            rx_dropped: g(&self.rx_dropped),
        }
    }

    /// Counts a drop in `counter` and logs `what` unless a line was logged for this pair less
    /// than a second ago (then the next line says how many were not logged).
    pub fn drop_frame(&self, counter: &AtomicU64, pair: u16, what: std::fmt::Arguments<'_>) {
        bump(counter, 1);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if log
            .last
            .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
        {
            log.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut log.suppressed);
        log.last = Some(now);
        drop(log);
        if suppressed > 0 {
            log::warn!("pair {pair}: dropped a frame: {what} ({suppressed} more drops not logged)");
        } else {
            log::warn!("pair {pair}: dropped a frame: {what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_counted_even_when_not_logged() {
        let s = PairStats::default();
        for _ in 0..100 {
            s.drop_frame(&s.tx_malformed, 0, format_args!("test"));
        }
        assert_eq!(s.snapshot().tx_malformed, 100);
        assert_eq!(s.log.lock().unwrap().suppressed, 99);
    }
}
