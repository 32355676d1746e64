//! Interop with a frontend no one here wrote: QEMU (TCG, memfd guest RAM shared with the
//! backend, `-netdev vhost-user` + `virtio-net-pci,vectors=0`) boots the Debian cloud kernel;
//! the guest's virtio-net driver talks to splitvmm-net, whose tap sits in a network namespace
//! the test made. The guest brings up its NIC, pings the host address there, and moves 64 MiB
//! over TCP each way (busybox nc) to and from sockets in the namespace; checksums must match.
//! Once with one queue pair, once with two (2 vCPUs; the uploads and downloads run on
//! different CPUs so both pairs carry traffic).

mod qemu;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

use qemu::{build_initrd, qemu_lock, sha256_file, Qemu};
use splitvmm_tests::vhost::net::daemon::{NetDaemon, NetDaemonOptions, HOST_IP};

const MIB: usize = 1 << 20;
const BYTES: usize = 64 * MIB;
/// Boot plus scenario under TCG on a loaded two-core host.
const GUEST_DEADLINE: Duration = Duration::from_secs(400);
const UP_PORT: u16 = 5001;
const DOWN_PORT: u16 = 5002;

const SCENARIO: &str = r#"
r() { echo "SPLITVMM-RESULT $*"; }
die() { r "error=$*"; exit 1; }
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -gt 200 ] && die "eth0 did not appear"; usleep 50000
done
ip link set lo up
ip link set eth0 up || die "link up failed"
ip addr add 10.77.0.2/24 dev eth0 || die "address failed"
r "queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
if ping -c 3 -W 10 10.77.0.1 > /tmp/ping 2>&1; then r ping=ok; else cat /tmp/ping; die "ping failed"; fi
dd if=/dev/urandom of=/tmp/up bs=1M count=64 2>/dev/null || die "dd failed"
r "up_sha=$(sha256sum /tmp/up | cut -d' ' -f1)"
taskset 1 nc 10.77.0.1 5001 < /tmp/up || die "upload failed"
rm -f /tmp/up
taskset CPUMASK nc 10.77.0.1 5002 < /dev/null > /tmp/down || die "download failed"
r "down_bytes=$(wc -c < /tmp/down)"
r "down_sha=$(sha256sum /tmp/down | cut -d' ' -f1)"
"#;

/// Deterministic pseudo-random bytes (xorshift64*).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A listener in the daemon's namespace on the host address.
fn listen(d: &NetDaemon, port: u16) -> TcpListener {
    d.ns()
        .enter(move || TcpListener::bind(SocketAddrV4::new(Ipv4Addr::from(HOST_IP), port)))
        .expect("entering the namespace")
        .expect("listening in the namespace")
}

/// Counters of pair `pair` from the daemon's end-of-session line.
fn pair_counter(log: &str, pair: u16, name: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("session 1: frontend disconnected"))
        .unwrap_or_else(|| panic!("no end of session 1 in:\n{log}"));
    let part = line
        .split(&format!("pair {pair}: "))
        .nth(1)
        .unwrap_or_else(|| panic!("no pair {pair} in {line}"));
    let words: Vec<&str> = part.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == name)
        .unwrap_or_else(|| panic!("no {name} in {part}"));
    words[at + 1].parse().unwrap_or(0)
}

fn run(pairs: u16) {
    let _lock = qemu_lock();
    let d = NetDaemon::start(&NetDaemonOptions {
        num_queue_pairs: pairs,
        log_level: "debug",
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("starting splitvmm-net: {e}"));
    let dir = d.dir().to_owned();
    let initrd = dir.join("initrd.cpio.gz");
    let cpumask = if pairs > 1 { "2" } else { "1" };
    build_initrd(&SCENARIO.replace("CPUMASK", cpumask), &initrd);

    // Upload sink: everything the guest sends, to a file.
    let up = listen(&d, UP_PORT);
    let up_file = dir.join("up.bin");
    let up_path = up_file.clone();
    let up_thread = std::thread::spawn(move || {
        let (mut conn, _) = up.accept().expect("accepting the upload");
        let mut data = Vec::with_capacity(BYTES);
        conn.read_to_end(&mut data).expect("reading the upload");
        std::fs::write(&up_path, &data).expect("writing the upload");
        data.len()
    });
    // Download source: 64 MiB of a known pattern.
    let down = listen(&d, DOWN_PORT);
    let down_data = pattern(BYTES, 0x5eed);
    let down_file = dir.join("down.bin");
    std::fs::write(&down_file, &down_data).unwrap();
    let down_thread = std::thread::spawn(move || {
        let (mut conn, _) = down.accept().expect("accepting the download");
        conn.write_all(&down_data).expect("sending the download");
        conn.shutdown(std::net::Shutdown::Write).ok();
        // Wait for the guest to close (its nc reads to EOF first).
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
    });

    let started = Instant::now();
    let mut qemu = Qemu::start(
        &initrd,
        d.socket(),
        "52:54:00:12:34:56",
        pairs,
        u32::from(pairs),
    );
    let status = qemu.wait_exit(GUEST_DEADLINE);
    let took = started.elapsed();
    assert!(
        status.is_some(),
        "QEMU still running after {GUEST_DEADLINE:?}; console tail:\n{}\nbackend:\n{}",
        qemu.tail(60),
        d.stderr()
    );
    assert!(
        qemu.console().contains("SPLITVMM-GUEST-DONE rc=0"),
        "scenario failed ({status:?}); console tail:\n{}\nbackend:\n{}",
        qemu.tail(60),
        d.stderr()
    );
    eprintln!("{pairs} pair(s): guest done in {took:?}");
    assert_eq!(qemu.result("queues").as_deref(), Some(&*pairs.to_string()));
    assert_eq!(qemu.result("ping").as_deref(), Some("ok"));
    let got = up_thread.join().expect("upload thread");
    assert_eq!(got, BYTES, "upload size");
    assert_eq!(
        qemu.result("up_sha").expect("up_sha"),
        sha256_file(&up_file),
        "upload checksum"
    );
    down_thread.join().expect("download thread");
    assert_eq!(
        qemu.result("down_bytes").as_deref(),
        Some(&*BYTES.to_string())
    );
    assert_eq!(
        qemu.result("down_sha").expect("down_sha"),
        sha256_file(&down_file),
        "download checksum"
    );
    d.wait_log(
        "session 1: frontend disconnected",
        1,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let log = d.stderr();
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("session 1"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for pair in 0..pairs {
        assert!(
            pair_counter(&log, pair, "tx") > 0,
            "pair {pair} sent nothing:\n{log}"
        );
        assert!(
            pair_counter(&log, pair, "rx") > 0,
            "pair {pair} received nothing:\n{log}"
        );
    }
}

#[test]
fn guest_pings_and_moves_64_mib_each_way_one_pair() {
    run(1);
}

#[test]
fn guest_pings_and_moves_64_mib_each_way_two_pairs() {
    run(2);
}
