//! A guest that sends bad requests as fast as it can must not flood the backend's log: each
//! call site logs at most `SPLITVMM_LOG_BURST` (default 10) warnings per second, then says how
//! many it suppressed; every request is still answered and the daemon keeps serving.

use std::time::{Duration, Instant};

use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, BlkRequest, BlkStatus};
use splitvmm_tests::vhost::blk_daemon::{BlkDaemon, BlkDaemonOptions};

const MIB: u64 = 1 << 20;
/// The daemon's default burst (common/src/logging.rs).
const DEFAULT_BURST: usize = 10;
const FLOOD: usize = 2000;

fn failure_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("request at descriptor") && l.contains("fails with"))
        .count()
}

#[test]
fn a_flood_of_bad_requests_is_answered_but_logged_at_a_bounded_rate() {
    let mut d = BlkDaemon::with_new_image(16 * MIB, &BlkDaemonOptions::default())
        .unwrap_or_else(|e| panic!("starting splitvmm-blk: {e}"));
    let mut dev = BlkFrontend::connect(d.socket(), BlkOptions::default()).unwrap();
    let q = dev.queue(0);
    let started = Instant::now();
    for i in 0..FLOOD {
        // An unknown request type: UNSUPP and one warning each, without the limit.
        let status = q
            .submit(&BlkRequest::new(99, 0, vec![]))
            .and_then(|_| {
                let mut done = Vec::new();
                q.wait_deadline(1, Instant::now() + Duration::from_secs(5), &mut done)?;
                Ok(done[0].status)
            })
            .unwrap_or_else(|e| panic!("bad request {i} was not answered: {e}"));
        assert_eq!(status, BlkStatus::Unsupp, "bad request {i}");
    }
    let elapsed = started.elapsed();
    // One more once the rate limiter's window has rolled over carries the count of what was
    // dropped. The current window started at or before the last request, so a window's length
    // after it is past its end: this wait is the condition itself, not a guess at a duration.
    let window_end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < window_end {
        std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
    }
    assert_eq!(
        q.submit(&BlkRequest::new(99, 0, vec![]))
            .and_then(|_| {
                let mut done = Vec::new();
                q.wait_deadline(1, Instant::now() + Duration::from_secs(5), &mut done)?;
                Ok(done[0].status)
            })
            .expect("the last bad request"),
        BlkStatus::Unsupp
    );
    // Still serving good requests.
    assert_eq!(q.write(8, &[0xa5; 4096]).unwrap(), BlkStatus::Ok);
    assert_eq!(q.read(8, 4096).unwrap().1, vec![0xa5; 4096]);
    assert!(d.is_running(), "the daemon died:\n{}", d.stderr());

    let log = d.stderr();
    let lines = failure_lines(&log);
    // Whole windows the flood spanned, plus the one the last request opened.
    let windows = elapsed.as_secs() as usize + 2;
    assert!(
        lines > DEFAULT_BURST && lines <= DEFAULT_BURST * windows,
        "{lines} failure lines for {} bad requests in {elapsed:?}; want {}..={}",
        FLOOD + 1,
        DEFAULT_BURST + 1,
        DEFAULT_BURST * windows
    );
    let suppressed: u64 = log
        .lines()
        .filter_map(|l| {
            l.split('(')
                .nth(1)?
                .strip_suffix(" similar lines suppressed)")
        })
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    assert!(
        suppressed as usize + lines == FLOOD + 1,
        "{lines} logged + {suppressed} reported suppressed != {} bad requests",
        FLOOD + 1
    );
}
