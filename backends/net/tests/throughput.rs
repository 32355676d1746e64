//! A throughput probe, not a test (ignored by default; it prints a table and asserts only that
//! frames moved): the same guest-less generator drives splitvmm-net and, when installed,
//! DPDK's testpmd (a `net_vhost` port forwarding to a `net_tap` port, Debian package
//! `dpdk-dev`), each with its tap in a namespace of its own.
//!
//! - TX: the frontend pushes UDP frames at a port nobody listens on behind the tap (the host
//!   stack drops them); frames completed per second.
//! - RX: a thread in the namespace floods the guest's address with UDP datagrams; frames
//!   received per second (bounded by how fast one host thread can send).
//! - Ceiling: the host's own UDP throughput between two namespaces over a veth pair.
//! - CPU: the backend process's user + system time over the run, per gigabit moved (testpmd
//!   busy-polls one core whatever the load).
//!
//! ```text
//! cargo test --release -p splitvmm-net --test throughput -- --ignored --nocapture
//! ```

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use splitvmm_tests::vhost::net::daemon::{
    ip_text, NetDaemon, NetDaemonOptions, GUEST_IP, GUEST_MAC, HOST_IP,
};
use splitvmm_tests::vhost::net::netns::NetNs;
use splitvmm_tests::vhost::net::packet::{self, Endpoints, UdpCsum, ETH_HLEN, IPV4_HLEN, UDP_HLEN};
use splitvmm_tests::vhost::net::{NetFrontend, NetHeader, NetOptions, HDR_LEN};
use splitvmm_tests::vhost::process::TempDir;
use splitvmm_tests::vhost::vring::Segment;

const RUN: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(10);

/// CPU time (user + system) of process `pid` so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// One measurement: Gbit/s, Mpps, backend CPU seconds per gigabit.
#[derive(Debug, Clone, Copy)]
struct Rate {
    gbit: f64,
    mpps: f64,
    cpu_per_gbit: f64,
}

fn rate(frames: u64, bytes: u64, secs: f64, cpu: Duration) -> Rate {
    let gbits = bytes as f64 * 8.0 / 1e9;
    Rate {
        gbit: gbits / secs,
        mpps: frames as f64 / secs / 1e6,
        cpu_per_gbit: cpu.as_secs_f64() / gbits.max(1e-9),
    }
}

fn tx_rate(dev: &mut NetFrontend, out: &Endpoints, pid: u32, frame_len: usize) -> Rate {
    let payload = vec![0x5a; frame_len - ETH_HLEN - IPV4_HLEN - UDP_HLEN];
    let frame = packet::udp_frame(out, 5000, 9, &payload, UdpCsum::Full);
    let mem = dev.memory().clone();
    let bufs: Vec<_> = (0..256)
        .map(|_| {
            let b = mem.alloc_owned((HDR_LEN + frame.len()) as u64, 64).unwrap();
            b.write(0, &NetHeader::plain().to_bytes()).unwrap();
            b.write(HDR_LEN as u64, &frame).unwrap();
            b
        })
        .collect();
    let q = dev.pair(0).tx.vring_mut();
    let mut frames = 0u64;
    let mut next = 0usize;
    let cpu0 = cpu(pid);
    let start = Instant::now();
    while start.elapsed() < RUN {
        while q.free_descriptors() > 0 {
            q.add_chain(&[Segment::readable(bufs[next % bufs.len()].buf())])
                .unwrap();
            next += 1;
        }
        q.publish().unwrap();
        q.notify().unwrap();
        loop {
            while q.pop_used().unwrap().is_some() {
                frames += 1;
            }
            if q.free_descriptors() > 128 {
                break;
            }
            if !q.enable_call().unwrap() {
                q.wait_call(Instant::now() + WAIT).unwrap();
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(frames > 0, "no TX frame completed");
    rate(frames, frames * frame_len as u64, secs, cpu(pid) - cpu0)
}

fn rx_rate(dev: &mut NetFrontend, ns: &NetNs, pid: u32, payload_len: usize) -> Rate {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let sender = ns
        .enter(|| UdpSocket::bind(SocketAddrV4::new(HOST_IP.into(), 0)))
        .unwrap()
        .unwrap();
    let t = std::thread::spawn(move || {
        let data = vec![0xa5u8; payload_len];
        while !flag.load(Ordering::Relaxed) {
            let _ = sender.send_to(&data, (Ipv4Addr::from(GUEST_IP), 9));
        }
    });
    let rx = &mut dev.pair(0).rx;
    let (mut frames, mut bytes) = (0u64, 0u64);
    let cpu0 = cpu(pid);
    let start = Instant::now();
    while start.elapsed() < RUN {
        let f = rx.recv(Instant::now() + WAIT).unwrap();
        frames += 1;
        bytes += f.data.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let used = cpu(pid) - cpu0;
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    rate(frames, bytes, secs, used)
}

/// Runs every measurement against a connected frontend.
fn measure(dev: &mut NetFrontend, ns: &NetNs, tap: &str, pid: u32) -> Vec<Rate> {
    dev.pair(0).rx.post(256, 2048).unwrap();
    ns.add_neighbour(tap, &ip_text(GUEST_IP), &GUEST_MAC)
        .unwrap();
    let out = Endpoints {
        src_mac: GUEST_MAC,
        dst_mac: ns.mac_of(tap).unwrap(),
        src_ip: GUEST_IP,
        dst_ip: HOST_IP,
    };
    vec![
        tx_rate(dev, &out, pid, 1514),
        tx_rate(dev, &out, pid, 64),
        rx_rate(dev, ns, pid, 1472),
        rx_rate(dev, ns, pid, 18),
    ]
}

/// Datagrams per sendmmsg/recvmmsg call in the veth ceiling: batching takes the per-syscall
/// cost out, so what is left is the veth pair and the IP/UDP path, not one syscall per frame.
const VETH_BATCH: usize = 64;

/// Sends `VETH_BATCH` copies of `payload` on the connected socket `fd` in one call.
fn send_batch(fd: std::os::fd::RawFd, payload: &[u8]) -> isize {
    let mut iov: Vec<libc::iovec> = (0..VETH_BATCH)
        .map(|_| libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is valid (null name and control, no iovecs).
    let mut msgs: Vec<libc::mmsghdr> = (0..VETH_BATCH)
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs` holds VETH_BATCH headers, each pointing to one iovec in `iov` that points
    // into `payload`; all outlive the call, and the kernel only reads them.
    unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), VETH_BATCH as u32, 0) as isize }
}

/// Receives up to `VETH_BATCH` datagrams on `fd` into `bufs`; returns (datagrams, bytes).
fn recv_batch(fd: std::os::fd::RawFd, bufs: &mut [[u8; 2048]]) -> (u64, u64) {
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is valid (null name and control, no iovecs).
    let mut msgs: Vec<libc::mmsghdr> = (0..iov.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: each header points to one iovec describing one of `bufs`, all of which outlive
    // the call; the kernel writes at most each buffer's length and sets msg_len.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            msgs.len() as u32,
            0,
            std::ptr::null_mut(),
        )
    };
    if n <= 0 {
        return (0, 0);
    }
    let n = n as usize;
    let bytes = msgs[..n]
        .iter()
        .map(|m| u64::from(m.msg_len) + (UDP_HLEN + IPV4_HLEN + ETH_HLEN) as u64)
        .sum();
    (n as u64, bytes)
}

/// The ceiling: UDP datagrams of `payload_len` bytes from one namespace to another over a
/// veth pair, sent and received in batches (sendmmsg/recvmmsg) by one thread each, counted by
/// the receiving socket: the host moving the same frames with no virtio in between.
fn veth_rate(payload_len: usize) -> Rate {
    use std::os::fd::AsRawFd;
    let a = NetNs::new("veth").unwrap();
    let b = NetNs::new("veth").unwrap();
    a.ip(&[
        "link",
        "add",
        "va",
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        b.name(),
    ])
    .unwrap();
    a.ip(&["addr", "add", "10.88.0.1/24", "dev", "va"]).unwrap();
    b.ip(&["addr", "add", "10.88.0.2/24", "dev", "vb"]).unwrap();
    a.ip(&["link", "set", "va", "up"]).unwrap();
    b.ip(&["link", "set", "vb", "up"]).unwrap();
    let rx = b.enter(|| UdpSocket::bind("10.88.0.2:9")).unwrap().unwrap();
    rx.set_read_timeout(Some(WAIT)).unwrap();
    let tx = a.enter(|| UdpSocket::bind("10.88.0.1:0")).unwrap().unwrap();
    tx.connect("10.88.0.2:9").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        let data = vec![0x11u8; payload_len];
        while !flag.load(Ordering::Relaxed) {
            let _ = send_batch(tx.as_raw_fd(), &data);
        }
    });
    let mut bufs = vec![[0u8; 2048]; VETH_BATCH];
    let (mut frames, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < RUN {
        let (n, b) = recv_batch(rx.as_raw_fd(), &mut bufs);
        frames += n;
        bytes += b;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    rate(frames, bytes, secs, Duration::ZERO)
}

/// testpmd with a vhost-user port on `socket` forwarding to tap `tap`, in `ns`.
struct Testpmd {
    child: Child,
}

impl Testpmd {
    fn start(ns: &NetNs, socket: &Path, tap: &str) -> Option<Testpmd> {
        let bin = ["/usr/bin/dpdk-testpmd", "/usr/local/bin/dpdk-testpmd"]
            .into_iter()
            .find(|p| Path::new(p).is_file())?;
        let child = ns
            .command(bin)
            .args(["--no-huge", "-m", "1024", "--no-pci", "--file-prefix"])
            .arg(format!("svmm{}", std::process::id()))
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={},queues=1", socket.display()))
            .arg("--vdev")
            .arg(format!("net_tap0,iface={tap}"))
            .args([
                "--",
                "--forward-mode=io",
                "--auto-start",
                "--nb-cores=1",
                "--total-num-mbufs=16384",
            ])
            // It reads commands from stdin: keep one open.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let end = Instant::now() + WAIT;
        while !socket.exists() || ns.ip(&["link", "show", "dev", tap]).is_err() {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Testpmd { child })
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "a probe that prints rates; run by hand (see the module docs)"]
fn throughput_probe() {
    let d = NetDaemon::start(&NetDaemonOptions::default()).unwrap();
    let mut dev = NetFrontend::connect(d.socket(), NetOptions::default()).unwrap();
    let ours = measure(
        &mut dev,
        d.ns(),
        splitvmm_tests::vhost::net::daemon::TAP,
        d.pid(),
    );
    drop(dev);

    let ns = NetNs::new("pmd").unwrap();
    let dir = TempDir::new("pmd").unwrap();
    let socket = dir.path().join("pmd.sock");
    let theirs = Testpmd::start(&ns, &socket, "pmdtap0").map(|pmd| {
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", ip_text(HOST_IP)),
            "dev",
            "pmdtap0",
        ])
        .unwrap();
        ns.ip(&["link", "set", "pmdtap0", "up"]).unwrap();
        let mut dev = NetFrontend::connect(&socket, NetOptions::default()).unwrap();
        let r = measure(&mut dev, &ns, "pmdtap0", pmd.child.id());
        drop(dev);
        r
    });
    let ceiling = [veth_rate(1472), veth_rate(18)];
    let rows = ["TX 1514 B", "TX   64 B", "RX 1514 B", "RX   60 B"];
    eprintln!("| load | splitvmm-net Gbit/s | Mpps | CPU s/Gbit | testpmd Gbit/s | Mpps | CPU s/Gbit | ratio |");
    eprintln!("|---|---|---|---|---|---|---|---|");
    for (i, name) in rows.iter().enumerate() {
        let o = ours[i];
        match theirs.as_ref().map(|t| t[i]) {
            Some(t) => eprintln!(
                "| {name} | {:.2} | {:.3} | {:.2} | {:.2} | {:.3} | {:.2} | {:.2}x |",
                o.gbit,
                o.mpps,
                o.cpu_per_gbit,
                t.gbit,
                t.mpps,
                t.cpu_per_gbit,
                o.mpps / t.mpps.max(1e-9)
            ),
            None => eprintln!(
                "| {name} | {:.2} | {:.3} | {:.2} | (no testpmd) | | | |",
                o.gbit, o.mpps, o.cpu_per_gbit
            ),
        }
    }
    for (c, name) in ceiling.iter().zip(["1514 B", "  60 B"]) {
        eprintln!(
            "| veth ceiling {name} (host UDP over a veth pair, batched) | {:.2} | {:.3} | | | | | |",
            c.gbit, c.mpps
        );
    }
}
