//! Protocol tests of `splitvmm-net` without a VM, part 3: what a buggy or hostile driver can
//! put in the rings. Every bad chain is returned (TX) or skipped (RX), dropped and counted,
//! logged at most once a second, and the daemon keeps serving.

mod common;

use std::net::Ipv4Addr;

use common::{deadline, Setup};
use splitvmm_tests::vhost::net::daemon::{NetDaemonOptions, GUEST_IP};
use splitvmm_tests::vhost::net::packet::{self, UdpCsum};
use splitvmm_tests::vhost::net::{NetHeader, NetOptions, HDR_LEN};
use splitvmm_tests::vhost::vring::{Link, RawDescriptor};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// The counters the daemon logs when the session ends, e.g. `tx_malformed=5`.
fn counter(log: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    log.rsplit(&key)
        .next()
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A good datagram still gets through after the bad chains.
fn still_serves(s: &mut Setup, port: u16) {
    let peer = s.peer_udp(port);
    let f = packet::udp_frame(&s.out, 5000, port, b"still alive", UdpCsum::Full);
    let tx = &mut s.dev().pair(0).tx;
    tx.send(&NetHeader::plain(), &f).unwrap();
    tx.wait_all(deadline()).unwrap();
    let mut buf = [0u8; 64];
    let n = peer
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("after bad chains: {e}\n{}", s.daemon.stderr()));
    assert_eq!(&buf[..n], b"still alive");
}

#[test]
fn bad_tx_chains_are_returned_dropped_and_counted() {
    let mut s = Setup::simple();
    let out = s.out;
    let mem = s.dev().memory().clone();
    let good = packet::udp_frame(&s.out, 5000, 7201, b"x", UdpCsum::Full);
    let buf = mem.alloc_owned(4096, 64).unwrap();
    buf.write(0, &NetHeader::plain().to_bytes()).unwrap();
    buf.write(HDR_LEN as u64, &good).unwrap();
    let len = (HDR_LEN + good.len()) as u32;
    let end = mem.guest_end();
    let d = |addr, len, flags, next| RawDescriptor {
        addr,
        len,
        flags,
        next,
    };
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("outside memory", vec![d(end + 4096, len, 0, Link::Pos(0))]),
        (
            "straddling the end",
            vec![d(end - 16, len, 0, Link::Pos(0))],
        ),
        (
            "address overflow",
            vec![d(u64::MAX - 8, len, 0, Link::Pos(0))],
        ),
        (
            "device-writable",
            vec![d(buf.gpa(), len, WRITE, Link::Pos(0))],
        ),
        (
            "loop",
            vec![
                d(buf.gpa(), 6, NEXT, Link::Pos(1)),
                d(buf.gpa() + 6, len - 6, NEXT, Link::Pos(0)),
            ],
        ),
        (
            "next out of range",
            vec![d(buf.gpa(), 6, NEXT, Link::Index(60000))],
        ),
        (
            "shorter than the header",
            vec![d(buf.gpa(), 5, 0, Link::Pos(0))],
        ),
        (
            "header only",
            vec![d(buf.gpa(), HDR_LEN as u32, 0, Link::Pos(0))],
        ),
    ];
    let tx = &mut s.dev().pair(0).tx;
    for (what, descs) in &cases {
        tx.send_raw(descs).unwrap_or_else(|e| panic!("{what}: {e}"));
        tx.wait_all(deadline())
            .unwrap_or_else(|e| panic!("{what}: not returned: {e}"));
    }
    // Oversized (no GSO, longer than the MTU) and header fields the features do not allow.
    let big = packet::udp_frame(&out, 5000, 7201, &[1u8; 3000], UdpCsum::Full);
    tx.send(&NetHeader::plain(), &big).unwrap();
    let mut bad_flags = NetHeader::plain();
    bad_flags.flags = 0x80;
    tx.send(&bad_flags, &good).unwrap();
    let mut bad_gso = NetHeader::plain();
    bad_gso.gso_type = 3;
    tx.send(&bad_gso, &good).unwrap();
    tx.wait_all(deadline()).unwrap();
    still_serves(&mut s, 7202);
    assert!(s.daemon.is_running());
    s.disconnect(1);
    let log = s.daemon.stderr();
    assert_eq!(counter(&log, "tx_malformed"), 10, "{log}");
    assert_eq!(counter(&log, "tx_oversized"), 1, "{log}");
    // Rate-limited: 11 drops within well under a second make far fewer log lines.
    let lines = log.matches("dropped a frame").count();
    assert!((1..=3).contains(&lines), "{lines} drop lines:\n{log}");
}

#[test]
fn bad_rx_chains_are_skipped_and_counted() {
    let mut s = Setup::new(&NetDaemonOptions::default(), NetOptions::default(), 0, 2048);
    let mem = s.dev().memory().clone();
    let end = mem.guest_end();
    let buf = mem.alloc_owned(2048, 64).unwrap();
    let rx = &mut s.dev().pair(0).rx;
    // A readable descriptor, one outside memory, one too short for the header.
    for descs in [
        vec![RawDescriptor {
            addr: buf.gpa(),
            len: 2048,
            flags: 0,
            next: Link::Pos(0),
        }],
        vec![RawDescriptor {
            addr: end + 8192,
            len: 2048,
            flags: WRITE,
            next: Link::Pos(0),
        }],
        vec![RawDescriptor {
            addr: buf.gpa(),
            len: 4,
            flags: WRITE,
            next: Link::Pos(0),
        }],
    ] {
        rx.post_raw(&descs).unwrap();
    }
    rx.post(32, 2048).unwrap();
    let peer = s.peer_udp(7203);
    for i in 0..4u8 {
        peer.send_to(&[i; 100], (Ipv4Addr::from(GUEST_IP), 6004))
            .unwrap();
    }
    // The first three frames each meet a bad chain and are dropped; the fourth arrives.
    let (_, p) = s.recv_matching(0, |p| p.udp().is_some_and(|u| u.1 == 6004));
    assert_eq!(p.udp().unwrap().3, &[3u8; 100][..], "{}", s.daemon.stderr());
    still_serves(&mut s, 7204);
    s.disconnect(1);
    let log = s.daemon.stderr();
    assert_eq!(counter(&log, "rx_bad_chains"), 3, "{log}");
}

/// 2000 chains of random bytes with random header fields and lengths: every one comes back,
/// the daemon stays up and still serves.
#[test]
fn random_tx_garbage_never_crashes_the_daemon() {
    let mut s = Setup::simple();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let tx = &mut s.dev().pair(0).tx;
    for i in 0..2000 {
        let len = (rnd() % 3000) as usize;
        let frame: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        let h = rnd().to_le_bytes();
        let hdr = NetHeader::parse(&[h, rnd().to_le_bytes()].concat()).unwrap();
        // Mostly sane-looking headers, so the checks past the flags are reached too.
        let hdr = if i % 2 == 0 {
            NetHeader {
                flags: hdr.flags & 1,
                gso_type: [0, 1, 4, 3][(rnd() % 4) as usize],
                ..hdr
            }
        } else {
            hdr
        };
        // Pieces of at least 64 bytes: at most 48 descriptors per chain.
        if tx.vring().free_descriptors() < 64 {
            tx.wait_all(deadline()).unwrap();
        }
        tx.send_split(&hdr, &frame, 64 + (rnd() % 700) as usize)
            .unwrap();
    }
    tx.wait_all(deadline()).unwrap();
    still_serves(&mut s, 7205);
}

/// Garbage on the control socket (an unknown request, a header announcing a 1 MiB payload, a
/// truncated header) ends that connection only; the next frontend is served.
#[test]
fn garbage_control_messages_end_only_that_connection() {
    use std::io::{Read, Write};
    let mut s = Setup::simple();
    s.disconnect(1);
    let header = |request: u32, flags: u32, size: u32| {
        [
            request.to_le_bytes(),
            flags.to_le_bytes(),
            size.to_le_bytes(),
        ]
        .concat()
    };
    for bytes in [
        header(9999, 1, 0),
        header(1, 1, 1 << 20),
        vec![0xff; 7],
        header(5, 1, 8).into_iter().chain([0u8; 8]).collect(),
    ] {
        let mut c = std::os::unix::net::UnixStream::connect(s.daemon.socket()).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        c.write_all(&bytes).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        // The daemon hangs up (EOF) rather than leaving us waiting.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }
    assert!(s.daemon.is_running(), "{}", s.daemon.stderr());
    s.connect(Default::default(), 64, 2048);
    still_serves(&mut s, 7206);
}
