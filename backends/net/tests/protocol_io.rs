//! Protocol tests of `splitvmm-net` without a VM, part 1: frames both ways between the test
//! frontend and sockets in the daemon's network namespace (UDP, ICMP through the host stack),
//! the config space and the feature offer.

mod common;

use common::{deadline, Setup};
use splitvmm_tests::vhost::net::daemon::{GUEST_IP, GUEST_MAC, HOST_IP};
use splitvmm_tests::vhost::net::packet::{self, UdpCsum, PROTO_ICMP};
use splitvmm_tests::vhost::net::{supported_features, NetHeader};

#[test]
fn config_space_and_features() {
    let mut s = Setup::simple();
    let c = s.dev().config();
    assert_eq!(c.mac, GUEST_MAC);
    assert_eq!(c.status & 1, 1, "link up");
    assert_eq!(c.max_virtqueue_pairs, 1);
    assert_eq!(c.mtu, 1500);
    let n = s.dev().negotiated();
    assert_eq!(
        n.offered_features & supported_features(),
        supported_features(),
        "everything the issue lists is offered: {:#x}",
        n.offered_features
    );
}

#[test]
fn udp_from_the_guest_reaches_a_peer_socket() {
    let mut s = Setup::simple();
    let peer = s.peer_udp(7001);
    for i in 0..50u32 {
        let payload = format!("guest datagram {i}").into_bytes();
        let f = packet::udp_frame(&s.out, 5000, 7001, &payload, UdpCsum::Full);
        let tx = &mut s.dev().pair(0).tx;
        tx.send(&NetHeader::plain(), &f).unwrap();
        tx.wait_all(deadline()).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = peer
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i}: {e}\n{}", s.daemon.stderr()));
        assert_eq!(&buf[..n], &payload[..]);
        assert_eq!(
            from.to_string(),
            format!("{}:5000", std::net::Ipv4Addr::from(GUEST_IP))
        );
    }
}

#[test]
fn udp_from_the_namespace_arrives_on_rx() {
    let mut s = Setup::simple();
    let peer = s.peer_udp(7002);
    for i in 0..50u32 {
        let payload = vec![i as u8; 100 + i as usize * 20];
        peer.send_to(&payload, (std::net::Ipv4Addr::from(GUEST_IP), 6000))
            .unwrap();
        let (frame, p) = s.recv_matching(0, |p| p.udp().is_some_and(|u| u.1 == 6000));
        let (sport, _, _, data) = p.udp().unwrap();
        assert_eq!(sport, 7002);
        assert_eq!(data, &payload[..], "datagram {i}");
        assert_eq!(p.dst_mac, GUEST_MAC);
        assert_eq!(p.src_ip, HOST_IP);
        assert_eq!(frame.header.num_buffers, 1);
    }
}

#[test]
fn ping_through_the_host_stack() {
    let mut s = Setup::simple();
    for seq in 0..20u16 {
        let payload = vec![seq as u8; 56];
        let f = packet::icmp_echo(&s.out, 0x77, seq, &payload);
        let tx = &mut s.dev().pair(0).tx;
        tx.send(&NetHeader::plain(), &f).unwrap();
        tx.wait_all(deadline()).unwrap();
        let (_, p) = s.recv_matching(0, |p| {
            p.proto == PROTO_ICMP
                && p.l4.first() == Some(&0)
                && p.l4.get(6..8) == Some(&seq.to_be_bytes())
        });
        assert_eq!(&p.l4[8..], &payload[..], "echo reply {seq}");
        assert_eq!(p.src_ip, HOST_IP);
    }
}

/// `--mtu 4000`: offered in the config space, set on the tap, and a 4000-byte IP packet from
/// the guest gets through while a frame longer than MTU + Ethernet + VLAN header (without
/// GSO) is dropped as oversized.
#[test]
fn mtu_is_offered_set_on_the_tap_and_enforced() {
    let dopts = splitvmm_tests::vhost::net::daemon::NetDaemonOptions {
        mtu: Some(4000),
        ..Default::default()
    };
    let mut s = Setup::new(
        &dopts,
        splitvmm_tests::vhost::net::NetOptions::default(),
        64,
        2048,
    );
    assert_eq!(s.dev().config().mtu, 4000);
    let link = s
        .daemon
        .ns()
        .ip(&[
            "link",
            "show",
            "dev",
            splitvmm_tests::vhost::net::daemon::TAP,
        ])
        .unwrap();
    assert!(link.contains("mtu 4000"), "{link}");
    let peer = s.peer_udp(7005);
    let too_big = packet::udp_frame(&s.out, 5000, 7005, &[1u8; 3990], UdpCsum::Full);
    let fits = vec![2u8; 3972];
    let tx = &mut s.dev().pair(0).tx;
    tx.send(&NetHeader::plain(), &too_big).unwrap();
    tx.wait_all(deadline()).unwrap();
    s.udp_to_peer(0, &peer, &fits);
    assert!(
        s.daemon.stderr().contains("oversized"),
        "{}",
        s.daemon.stderr()
    );
}
