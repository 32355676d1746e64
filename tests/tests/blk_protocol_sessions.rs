//! Protocol tests of `splitvmm-blk` without a VM, part 3: sessions. A frontend that goes away
//! must leave nothing behind in the daemon (descriptors, threads, mappings, memory), and the
//! next frontend is served; a frontend that reconnects resumes its rings.

use std::time::{Duration, Instant};

use splitvmm_tests::vhost::blk::conformance::{self, pattern};
use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, BlkStatus};
use splitvmm_tests::vhost::blk_daemon::{BlkDaemon, BlkDaemonOptions, ProcUsage};

const MIB: u64 = 1 << 20;
const CYCLES: u32 = 100;

/// Polls until `check` holds for the daemon's usage or `limit` passes; returns the last usage.
fn wait_for(
    d: &BlkDaemon,
    limit: Duration,
    check: impl Fn(&ProcUsage) -> bool,
) -> (bool, ProcUsage) {
    let deadline = Instant::now() + limit;
    loop {
        let u = d.usage().expect("reading the daemon's /proc entries");
        if check(&u) {
            return (true, u);
        }
        if Instant::now() >= deadline {
            return (false, u);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 100 frontends, each with two queues, 512 KiB of I/O and a disconnect. Bounds asserted:
/// - descriptors and threads: back to exactly the idle count after every disconnect (a leak of
///   one eventfd, socket or worker thread per session shows at once);
/// - mappings (/proc/PID/maps lines): at most 8 more after cycle 100 than after cycle 10 (a
///   leaked guest-memory mapping or thread stack adds at least one per session: 90);
/// - virtual size: at most 64 MiB more (one leaked 64 MiB guest mapping per session would add
///   5.6 GiB; one leaked 8 MiB thread stack per session 720 MiB);
/// - RSS: at most 8 MiB more (each session makes the daemon touch 512 KiB of guest memory, so
///   kept mappings would add 45 MiB; the slack is for the allocator's arenas and caches).
#[test]
fn a_hundred_connect_disconnect_cycles_leak_nothing() {
    let d = BlkDaemon::with_new_image(
        64 * MIB,
        &BlkDaemonOptions {
            num_queues: 2,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("starting splitvmm-blk: {e}"));
    // Idle: the daemon has started its signal thread and logged that it serves.
    let start = Instant::now();
    while !d.stderr().contains("serving ") {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", d.stderr());
        std::thread::sleep(Duration::from_millis(2));
    }
    let idle = d.usage().unwrap();
    eprintln!("idle: {idle:?}");
    let mut at_10 = None;
    let begun = Instant::now();
    for i in 0..CYCLES {
        {
            let mut dev = BlkFrontend::connect(d.socket(), BlkOptions::default().with_queues(2))
                .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
            let data = pattern(256 * 1024, i as u8);
            let sector = u64::from(i % 64) * 512;
            assert_eq!(
                dev.queue((i % 2) as usize).write(sector, &data).unwrap(),
                BlkStatus::Ok
            );
            let (status, back) = dev
                .queue(((i + 1) % 2) as usize)
                .read(sector, 256 * 1024)
                .unwrap();
            assert_eq!(status, BlkStatus::Ok, "cycle {i}");
            assert!(back == data, "cycle {i}: read-back differs");
            if i == 0 {
                let busy = d.usage().unwrap();
                eprintln!("connected: {busy:?}");
                assert!(
                    busy.threads >= idle.threads + 2,
                    "no worker threads? {busy:?}"
                );
            }
        }
        let (ok, u) = wait_for(&d, Duration::from_secs(5), |u| {
            u.fds == idle.fds && u.threads == idle.threads
        });
        assert!(
            ok,
            "cycle {i}: after the disconnect the daemon has {} fds and {} threads, idle had {} and {}",
            u.fds, u.threads, idle.fds, idle.threads
        );
        if i == 9 {
            at_10 = Some(u);
        }
    }
    let at_10 = at_10.unwrap();
    let at_100 = d.usage().unwrap();
    eprintln!(
        "{CYCLES} cycles in {:?}; after 10: {at_10:?}; after {CYCLES}: {at_100:?}",
        begun.elapsed()
    );
    assert!(
        at_100.mappings <= at_10.mappings + 8,
        "mappings grew: {at_10:?} -> {at_100:?}"
    );
    assert!(
        at_100.vm_size_kib <= at_10.vm_size_kib + 64 * 1024,
        "virtual size grew: {at_10:?} -> {at_100:?}"
    );
    assert!(
        at_100.rss_kib <= at_10.rss_kib + 8 * 1024,
        "RSS grew: {at_10:?} -> {at_100:?}"
    );
    // Still serving, with everything written by the 100 sessions.
    let mut dev = BlkFrontend::connect(d.socket(), BlkOptions::default()).unwrap();
    for i in (CYCLES - 64)..CYCLES {
        let sector = u64::from(i % 64) * 512;
        assert!(
            dev.queue(0).read(sector, 256 * 1024).unwrap().1 == pattern(256 * 1024, i as u8),
            "data of cycle {i}"
        );
    }
    let log = d.stderr();
    assert_eq!(
        log.matches("frontend disconnected").count(),
        CYCLES as usize,
        "one disconnect line per session:\n{log}"
    );
}

/// A frontend that stops its rings (GET_VRING_BASE), reconnects and resumes at the used index
/// gets its requests served on the same rings, and the daemon keeps them going.
#[test]
fn reconnect_resumes_the_same_rings() {
    let mut d = BlkDaemon::with_new_image(
        16 * MIB,
        &BlkDaemonOptions {
            num_queues: 2,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("starting splitvmm-blk: {e}"));
    let mut dev = BlkFrontend::connect(d.socket(), BlkOptions::default().with_queues(2)).unwrap();
    conformance::check_reconnect_resumes_rings(&mut dev, || d.is_running());
    // A request made available while disconnected is served after the reconnect's kick.
    dev.disconnect();
    let mem = dev.memory().clone();
    let buf = mem.alloc_owned(4096, 4096).unwrap();
    buf.write(0, &pattern(4096, 0xee)).unwrap();
    let q = dev.queue(0);
    q.enqueue(&splitvmm_tests::vhost::blk::BlkRequest::write(
        800,
        &[buf.buf()],
    ))
    .unwrap();
    q.vring_mut().publish().unwrap();
    dev.reconnect().unwrap();
    let mut done = Vec::new();
    dev.queue(0).wait(1, &mut done).unwrap();
    assert_eq!(done[0].status, BlkStatus::Ok);
    assert!(dev.queue(1).read(800, 4096).unwrap().1 == pattern(4096, 0xee));
}
