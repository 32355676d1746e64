//! `--tap-fd`: a tap the caller opened (in the namespace, with IFF_VNET_HDR) and handed over as
//! an inherited descriptor carries traffic both ways; one opened without IFF_VNET_HDR is
//! refused with one line.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use splitvmm_tests::vhost::net::daemon::{ip_text, GUEST_IP, GUEST_MAC, HOST_IP};
use splitvmm_tests::vhost::net::netns::NetNs;
use splitvmm_tests::vhost::net::packet::{self, Endpoints, UdpCsum};
use splitvmm_tests::vhost::net::{NetFrontend, NetHeader, NetOptions};
use splitvmm_tests::vhost::process::{BackendProcess, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_splitvmm-net");
const WAIT: Duration = Duration::from_secs(5);

/// Opens tap `name` inside `ns` with `flags`, without O_CLOEXEC so a child inherits it.
fn open_tap(ns: &NetNs, name: &'static str, flags: i32) -> OwnedFd {
    ns.enter(move || {
        // SAFETY: a plain open of a device node; the result is checked.
        let fd: RawFd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
        assert!(
            fd >= 0,
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just opened and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF takes a pointer to an ifreq that outlives the call.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        owned
    })
    .expect("entering the namespace")
}

#[test]
fn an_inherited_tap_descriptor_carries_traffic() {
    let ns = NetNs::new("tapfd").unwrap();
    let tap = open_tap(
        &ns,
        "fdtap0",
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
    );
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tap).to_string();
    let dir = TempDir::new("tapfd").unwrap();
    let socket = dir.path().join("net.sock");
    let mut cmd = ns.command(BIN);
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--tap-fd", &fd, "--mac", "52:54:00:12:34:56", "--host-ip"])
        .arg(format!("{}/24", ip_text(HOST_IP)));
    let mut daemon =
        BackendProcess::spawn("splitvmm-net", &mut cmd, dir.path(), socket.clone(), WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
    ns.add_neighbour("fdtap0", &ip_text(GUEST_IP), &GUEST_MAC)
        .unwrap();
    let mut dev = NetFrontend::connect(&socket, NetOptions::default())
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.stderr()));
    dev.pair(0).rx.post(64, 2048).unwrap();
    let peer = ns
        .enter(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::from(HOST_IP), 7501)))
        .unwrap()
        .unwrap();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    let out = Endpoints {
        src_mac: GUEST_MAC,
        dst_mac: ns.mac_of("fdtap0").unwrap(),
        src_ip: GUEST_IP,
        dst_ip: HOST_IP,
    };
    let f = packet::udp_frame(&out, 5000, 7501, b"through an inherited fd", UdpCsum::Full);
    let tx = &mut dev.pair(0).tx;
    tx.send(&NetHeader::plain(), &f).unwrap();
    tx.wait_all(Instant::now() + WAIT).unwrap();
    let mut buf = [0u8; 64];
    let n = peer
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.stderr()));
    assert_eq!(&buf[..n], b"through an inherited fd");
    peer.send_to(b"back", (Ipv4Addr::from(GUEST_IP), 6500))
        .unwrap();
    let end = Instant::now() + WAIT;
    loop {
        let frame = dev.pair(0).rx.recv(end).unwrap();
        let p = packet::parse(&frame.data);
        if let Some(p) = p.filter(|p| p.udp().is_some_and(|u| u.1 == 6500)) {
            assert_eq!(p.udp().unwrap().3, b"back");
            break;
        }
    }
    drop(dev);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait_exit(WAIT).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
}

#[test]
fn a_tap_descriptor_without_vnet_hdr_is_refused() {
    let ns = NetNs::new("tapfd").unwrap();
    let tap = open_tap(&ns, "fdtap1", libc::IFF_TAP | libc::IFF_NO_PI);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tap).to_string();
    let dir = TempDir::new("tapfd").unwrap();
    let socket = dir.path().join("net.sock");
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), BIN, "--socket"])
        .arg(&socket)
        .args(["--tap-fd", &fd])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("lacks IFF_VNET_HDR"), "{stderr}");
}
