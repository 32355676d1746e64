//! Protocol tests of `splitvmm-net` without a VM, part 2: checksum and segmentation offloads
//! in both directions, and mergeable receive buffers.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{deadline, Setup};
use splitvmm_tests::vhost::net::daemon::{NetDaemonOptions, GUEST_IP, HOST_IP};
use splitvmm_tests::vhost::net::packet::{
    self, Tcp, UdpCsum, ETH_HLEN, IPV4_HLEN, PROTO_TCP, TCP_HLEN,
};
use splitvmm_tests::vhost::net::{NetHeader, NetOptions};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
};

const L4_START: u16 = (ETH_HLEN + IPV4_HLEN) as u16;

/// A datagram with a wrong checksum is dropped by the host stack; the same with NEEDS_CSUM and
/// only the pseudo-header sum in the field arrives: the header reached the tap.
#[test]
fn tx_checksum_offload() {
    let mut s = Setup::simple();
    let peer = s.peer_udp(7101);
    let bad = packet::udp_frame(&s.out, 5000, 7101, b"wrong checksum", UdpCsum::Wrong);
    let partial = packet::udp_frame(&s.out, 5000, 7101, b"offloaded", UdpCsum::Partial);
    let tx = &mut s.dev().pair(0).tx;
    tx.send(&NetHeader::plain(), &bad).unwrap();
    tx.send(&NetHeader::needs_csum(L4_START, 6), &partial)
        .unwrap();
    tx.wait_all(deadline()).unwrap();
    let mut buf = [0u8; 256];
    let n = peer.recv(&mut buf).expect("the offloaded datagram");
    assert_eq!(
        &buf[..n],
        b"offloaded",
        "the bad-checksum one must not arrive first"
    );
}

/// A 16 KB TCP segment sent as one TSO4 frame: the host has no listener and answers with a
/// reset that acknowledges exactly seq + 16000, so the stack took the whole super-frame.
#[test]
fn tx_tso4_super_frame() {
    let mut s = Setup::simple();
    let payload: Vec<u8> = (0..16_000u32).map(|i| i as u8).collect();
    let seq = 1_000_000u32;
    // PSH without ACK: the reset then acknowledges seq + payload length.
    let tcp = Tcp {
        sport: 40000,
        dport: 9,
        seq,
        ack: 0,
        flags: 0x08,
    };
    let f = packet::tcp_partial(&s.out, tcp, &payload);
    let hdr = NetHeader::tso4((ETH_HLEN + IPV4_HLEN + TCP_HLEN) as u16, 1448, L4_START);
    let tx = &mut s.dev().pair(0).tx;
    tx.send_split(&hdr, &f, 4096).unwrap();
    tx.wait_all(deadline()).unwrap();
    let (_, p) = s.recv_matching(0, |p| p.proto == PROTO_TCP);
    let flags = p.l4[13];
    assert_eq!(flags & 0x04, 0x04, "a reset: {flags:#x}");
    let ack = u32::from_be_bytes([p.l4[8], p.l4[9], p.l4[10], p.l4[11]]);
    assert_eq!(ack, seq + 16_000);
}

/// With GUEST_CSUM the host leaves UDP checksums to the guest (NEEDS_CSUM on RX); without it
/// every frame carries a full, valid checksum.
#[test]
fn rx_checksum_offload_follows_guest_csum() {
    for offload in [true, false] {
        let nopts = if offload {
            NetOptions::default()
        } else {
            NetOptions::default().without_feature(VIRTIO_NET_F_GUEST_CSUM)
        };
        let mut s = Setup::new(&NetDaemonOptions::default(), nopts, 64, 2048);
        let peer = s.peer_udp(7102);
        peer.send_to(b"checksum me", (Ipv4Addr::from(GUEST_IP), 6001))
            .unwrap();
        let (frame, p) = s.recv_matching(0, |p| p.udp().is_some_and(|u| u.1 == 6001));
        let needs = frame.header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0;
        assert_eq!(needs, offload, "header {:?}", frame.header);
        if offload {
            assert_eq!(frame.header.csum_start, L4_START);
            assert_eq!(frame.header.csum_offset, 6);
        } else {
            assert!(p.l4_checksum_ok(), "full checksum without GUEST_CSUM");
        }
    }
}

/// MRG_RXBUF: 256-byte buffers, 1400-byte datagrams: each frame spans several buffers, told by
/// num_buffers, and arrives intact.
#[test]
fn mergeable_rx_buffers() {
    let mut s = Setup::new(
        &NetDaemonOptions::default(),
        NetOptions::default(),
        200,
        256,
    );
    assert!(s.dev().has_feature(VIRTIO_NET_F_MRG_RXBUF));
    let peer = s.peer_udp(7103);
    for i in 0..30u8 {
        let payload: Vec<u8> = (0..1400u32).map(|b| (b as u8) ^ i).collect();
        peer.send_to(&payload, (Ipv4Addr::from(GUEST_IP), 6002))
            .unwrap();
        let (frame, p) = s.recv_matching(0, |p| p.udp().is_some_and(|u| u.1 == 6002));
        assert!(
            frame.buffers >= 6,
            "{} buffers for a 1.4 KB frame",
            frame.buffers
        );
        assert_eq!(p.udp().unwrap().3, &payload[..], "datagram {i}");
    }
}

/// Without MRG_RXBUF a frame larger than the buffer is dropped and counted; the next one that
/// fits is delivered.
#[test]
fn too_small_rx_buffers_without_mrg_rxbuf_drop_the_frame() {
    let mut s = Setup::new(
        &NetDaemonOptions::default(),
        NetOptions::default().without_feature(VIRTIO_NET_F_MRG_RXBUF),
        64,
        256,
    );
    let peer = s.peer_udp(7104);
    peer.send_to(&[7u8; 1000], (Ipv4Addr::from(GUEST_IP), 6003))
        .unwrap();
    s.daemon
        .wait_log("larger than the RX buffer", 1, Duration::from_secs(5))
        .unwrap();
    peer.send_to(b"small", (Ipv4Addr::from(GUEST_IP), 6003))
        .unwrap();
    let (frame, p) = s.recv_matching(0, |p| p.udp().is_some_and(|u| u.1 == 6003));
    assert_eq!(p.udp().unwrap().3, b"small");
    assert_eq!(frame.buffers, 1);
}

/// GUEST_TSO4: a TCP connection from the guest (handshake by hand) to a listener in the
/// namespace, which then sends 200 KB: the host hands the guest GSO super-frames (gso_type
/// TCPV4, longer than the MTU) spread over mergeable buffers.
#[test]
fn rx_tso4_super_frames_over_mergeable_buffers() {
    let mut s = Setup::simple();
    let listener = s
        .daemon
        .ns()
        .enter(|| std::net::TcpListener::bind((Ipv4Addr::from(HOST_IP), 8000)))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let _ = std::io::Write::write_all(&mut conn, &[0x42u8; 200_000]);
        conn
    });
    let isn = 7_000_000u32;
    let syn = Tcp {
        sport: 40001,
        dport: 8000,
        seq: isn,
        ack: 0,
        flags: 0x02,
    };
    let csum = NetHeader::needs_csum(L4_START, 16);
    let out = s.out;
    s.dev()
        .pair(0)
        .tx
        .send(&csum, &packet::tcp_partial(&out, syn, &[]))
        .unwrap();
    let (_, synack) = s.recv_matching(0, |p| p.proto == PROTO_TCP && p.l4[13] == 0x12);
    let their = u32::from_be_bytes([synack.l4[4], synack.l4[5], synack.l4[6], synack.l4[7]]);
    let ack = Tcp {
        seq: isn + 1,
        ack: their.wrapping_add(1),
        flags: 0x10,
        ..syn
    };
    s.dev()
        .pair(0)
        .tx
        .send(&csum, &packet::tcp_partial(&out, ack, &[]))
        .unwrap();
    let (frame, p) = s.recv_matching(0, |p| p.proto == PROTO_TCP && p.l4.len() > TCP_HLEN + 1460);
    assert_eq!(
        u32::from(frame.header.gso_type),
        VIRTIO_NET_HDR_GSO_TCPV4,
        "{:?}",
        frame.header
    );
    assert!(frame.header.gso_size > 0);
    assert!(
        frame.buffers > 1,
        "a {}-byte frame in {} buffer(s)",
        frame.data.len(),
        frame.buffers
    );
    assert!(p.l4[TCP_HLEN..].iter().all(|b| *b == 0x42));
    drop(server);
}
