//! Protocol tests of `splitvmm-net` without a VM, part 4: sessions. A frontend that goes away
//! leaves nothing behind in the daemon (descriptors, threads, memory), and the next frontend
//! is served, on every queue pair.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::Setup;
use splitvmm_tests::vhost::blk_daemon::ProcUsage;
use splitvmm_tests::vhost::net::daemon::{NetDaemon, NetDaemonOptions, GUEST_IP};
use splitvmm_tests::vhost::net::NetOptions;

const CYCLES: u32 = 100;

fn wait_for(
    d: &NetDaemon,
    limit: Duration,
    check: impl Fn(&ProcUsage) -> bool,
) -> (bool, ProcUsage) {
    let deadline = Instant::now() + limit;
    loop {
        let u = d.usage().expect("reading the daemon's /proc entries");
        if check(&u) || Instant::now() >= deadline {
            return (check(&u), u);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 100 frontends with two queue pairs each, a datagram out on each pair and one in, then a
/// disconnect. Bounds: descriptors and threads back to exactly the idle count after every
/// disconnect (one leaked eventfd, socket or thread per session shows at once); RSS at most
/// 8 MiB and mappings at most 8 more after cycle 100 than after cycle 10 (each session maps
/// 64 MiB of frontend memory and the daemon touches its buffers: a kept mapping per session
/// would add far more).
#[test]
fn a_hundred_connect_disconnect_cycles_leak_nothing() {
    let dopts = NetDaemonOptions {
        num_queue_pairs: 2,
        ..Default::default()
    };
    let nopts = NetOptions::default().with_pairs(2);
    let mut s = Setup::new(&dopts, nopts.clone(), 32, 2048);
    let peer = s.peer_udp(7301);
    s.udp_to_peer(0, &peer, b"warm-up");
    s.disconnect(1);
    let idle = s.daemon.usage().expect("/proc");
    eprintln!("idle: {idle:?}");
    let mut at_10 = None;
    let begun = Instant::now();
    for i in 0..CYCLES {
        s.connect(nopts.clone(), 32, 2048);
        let payload = format!("cycle {i}").into_bytes();
        s.udp_to_peer((i % 2) as usize, &peer, &payload);
        peer.send_to(&payload, (Ipv4Addr::from(GUEST_IP), 6100))
            .unwrap();
        let (_, p) = s.recv_any(|p| p.udp().is_some_and(|u| u.1 == 6100));
        assert_eq!(p.udp().unwrap().3, &payload[..]);
        s.disconnect(i + 2);
        let (ok, u) = wait_for(&s.daemon, Duration::from_secs(5), |u| {
            u.fds == idle.fds && u.threads == idle.threads
        });
        assert!(
            ok,
            "cycle {i}: {u:?} vs idle {idle:?}\n{}",
            s.daemon.stderr()
        );
        if i == 10 {
            at_10 = Some(u);
        }
    }
    let end = s.daemon.usage().unwrap();
    let at_10 = at_10.unwrap();
    eprintln!(
        "{CYCLES} cycles in {:?}; after 10: {at_10:?}; after {CYCLES}: {end:?}",
        begun.elapsed()
    );
    assert!(
        end.rss_kib <= at_10.rss_kib + 8 * 1024,
        "RSS grew from {} to {} KiB",
        at_10.rss_kib,
        end.rss_kib
    );
    assert!(end.mappings <= at_10.mappings + 8, "{at_10:?} -> {end:?}");
}

/// The second queue pair carries traffic both ways, and the tap steers the host's replies to
/// a pair the guest uses.
#[test]
fn two_queue_pairs_both_carry_traffic() {
    let dopts = NetDaemonOptions {
        num_queue_pairs: 2,
        ..Default::default()
    };
    let mut s = Setup::new(&dopts, NetOptions::default().with_pairs(2), 64, 2048);
    assert_eq!(s.dev().config().max_virtqueue_pairs, 2);
    let peer = s.peer_udp(7302);
    let mut seen = [0u32; 2];
    for i in 0..64u16 {
        s.udp_to_peer(usize::from(i % 2), &peer, &i.to_be_bytes());
        // Different source ports: different flows, spread over the tap's queues.
        let from = s
            .daemon
            .ns()
            .enter(move || std::net::UdpSocket::bind((Ipv4Addr::from(common_host()), 20000 + i)))
            .unwrap()
            .unwrap();
        from.send_to(&i.to_be_bytes(), (Ipv4Addr::from(GUEST_IP), 6200))
            .unwrap();
        let (pair, p) = s.recv_any(|p| p.udp().is_some_and(|u| u.1 == 6200));
        assert_eq!(p.udp().unwrap().3, &i.to_be_bytes());
        seen[pair] += 1;
    }
    eprintln!("RX frames per pair: {seen:?}");
    assert_eq!(seen.iter().sum::<u32>(), 64);
}

fn common_host() -> [u8; 4] {
    splitvmm_tests::vhost::net::daemon::HOST_IP
}

/// SIGTERM while a frontend is connected and traffic flows: exit 0, promptly.
#[test]
fn sigterm_with_a_frontend_connected_exits_0() {
    let mut s = Setup::simple();
    let peer = s.peer_udp(7303);
    s.udp_to_peer(0, &peer, b"before SIGTERM");
    let started = Instant::now();
    s.daemon.process().signal(nix::sys::signal::Signal::SIGTERM);
    let status = s
        .daemon
        .process()
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM\n{}", s.daemon.stderr()));
    assert_eq!(status.code(), Some(0), "{}", s.daemon.stderr());
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    assert!(s.daemon.stderr().contains("stopped after 1 session(s)"));
}
