//! The malformed-chain API end to end against qemu-storage-daemon: every case is queued,
//! published and kicked, and the frontend comes back within its deadline whatever the backend
//! does with it (fail the request, drop it, or stop the ring). What qsd does is printed, not
//! judged: it is the reference, not the code under test.

use std::time::{Duration, Instant};

use splitvmm_tests::vhost::blk::malformed::{enqueue_bogus_head, enqueue_malformed, Malformed};
use splitvmm_tests::vhost::blk::queue::QueueError;
use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, BlkStatus};
use splitvmm_tests::vhost::qsd::{Qsd, QsdOptions};
use splitvmm_tests::vhost::vring::VringError;

const WAIT: Duration = Duration::from_millis(500);

/// What became of one malformed request, in words.
fn run_case(dev: &mut BlkFrontend, case: Option<Malformed>) -> String {
    let size = dev.queue(0).vring().size();
    let q = dev.queue(0);
    let _keep = match case {
        Some(kind) => Some(enqueue_malformed(q, kind, 8, 7).expect("queueing the chain")),
        None => {
            enqueue_bogus_head(q, size + 3).expect("queueing the bogus head");
            None
        }
    };
    q.commit().unwrap();
    let start = Instant::now();
    let mut done = Vec::new();
    let fate = match q.wait_deadline(1, start + WAIT, &mut done) {
        Ok(_) => format!("{:?}, used len {}", done[0].status, done[0].used_len),
        Err(QueueError::Vring(VringError::Timeout { .. })) => "no completion".to_owned(),
        Err(QueueError::Vring(e @ VringError::BogusUsedId { .. })) => e.to_string(),
        Err(e) => panic!("{case:?}: waiting failed: {e}"),
    };
    assert!(
        start.elapsed() < WAIT + Duration::from_secs(1),
        "{case:?}: the wait overran its deadline"
    );
    fate
}

#[test]
fn every_malformed_case_is_submitted_and_the_frontend_keeps_its_deadlines() {
    let mut table = Vec::new();
    let cases: Vec<Option<Malformed>> = Malformed::ALL
        .iter()
        .copied()
        .map(Some)
        .chain([None])
        .collect();
    for case in cases {
        // A fresh daemon per case: one broken ring must not colour the next case.
        let mut d = Qsd::with_new_image(16 << 20, &QsdOptions::default()).unwrap();
        let mut dev = BlkFrontend::connect(d.socket(), BlkOptions::default()).unwrap();
        // A good request first, so the ring is known to work before the bad one.
        assert_eq!(dev.queue(0).write(0, &[1u8; 4096]).unwrap(), BlkStatus::Ok);
        let fate = run_case(&mut dev, case);
        let alive = d.is_running();
        // Does the same connection still serve a good request?
        let after = if alive {
            let q = dev.queue(0);
            q.set_options(splitvmm_tests::vhost::blk::QueueOptions {
                timeout: WAIT,
                ..q.options()
            });
            match q.read(0, 4096) {
                Ok((s, _)) => format!("{s:?}"),
                Err(e) => format!("fails ({})", short(&e.to_string())),
            }
        } else {
            "-".to_owned()
        };
        drop(dev);
        // And a new connection?
        let fresh = if d.is_running() {
            match BlkFrontend::connect(d.socket(), BlkOptions::default())
                .map_err(|e| e.to_string())
                .and_then(|mut dev| dev.queue(0).read(0, 4096).map_err(|e| e.to_string()))
            {
                Ok((s, _)) => format!("{s:?}"),
                Err(e) => format!("fails ({})", short(&e)),
            }
        } else {
            "-".to_owned()
        };
        let name = case.map_or("avail head out of range".to_owned(), |c| format!("{c:?}"));
        table.push(format!(
            "{name:<24} {fate:<28} qsd alive: {:<5} same conn: {:<28} new conn: {fresh}",
            d.is_running(),
            after,
        ));
    }
    eprintln!(
        "qemu-storage-daemon and malformed chains:\n{}",
        table.join("\n")
    );
}

fn short(s: &str) -> String {
    s.chars().take(40).collect()
}
