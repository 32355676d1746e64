//! The tap deleted under a running daemon: it logs it, keeps its socket and its frontend,
//! returns (drops and counts) TX frames, and resumes both ways once a tap of that name exists
//! again, with the header size, offloads, MTU and `--host-ip` applied again.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{deadline, Setup};
use splitvmm_tests::vhost::net::daemon::{ip_text, GUEST_IP, GUEST_MAC, HOST_IP, TAP};
use splitvmm_tests::vhost::net::packet::{self, UdpCsum};
use splitvmm_tests::vhost::net::NetHeader;

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn deleted_tap_drops_tx_then_resumes_when_it_returns() {
    let mut s = Setup::simple();
    let peer = s.peer_udp(7401);
    s.udp_to_peer(0, &peer, b"before");

    s.daemon.ns().ip(&["link", "del", TAP]).unwrap();
    s.daemon.wait_log("was deleted", 1, WAIT).unwrap();
    // The frontend keeps its session: TX chains come back (dropped), nothing hangs.
    for i in 0..20u8 {
        let f = packet::udp_frame(&s.out, 5000, 7401, &[i; 64], UdpCsum::Full);
        s.dev().pair(0).tx.send(&NetHeader::plain(), &f).unwrap();
    }
    s.dev().pair(0).tx.wait_all(deadline()).unwrap();
    assert!(s.daemon.is_running());

    // A tap of that name again (persistent, made by someone else): the daemon attaches to it
    // and puts its address back.
    s.daemon
        .ns()
        .ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])
        .unwrap();
    s.daemon.wait_log("is back", 1, WAIT).unwrap();
    s.daemon
        .ns()
        .wait_for_interface(TAP, Some(&ip_text(HOST_IP)), WAIT)
        .unwrap();
    s.daemon
        .ns()
        .add_neighbour(TAP, &ip_text(GUEST_IP), &GUEST_MAC)
        .unwrap();
    s.out.dst_mac = s.daemon.tap_mac().unwrap();
    let peer = s.peer_udp(7402);
    s.udp_to_peer(0, &peer, b"after");
    peer.send_to(b"inbound after", (Ipv4Addr::from(GUEST_IP), 6300))
        .unwrap();
    let (_, p) = s.recv_matching(0, |p| p.udp().is_some_and(|u| u.1 == 6300));
    assert_eq!(p.udp().unwrap().3, b"inbound after");

    s.disconnect(1);
    let log = s.daemon.stderr();
    assert!(log.contains("tx_dropped=20"), "{log}");
}

/// Deleted while no frontend is connected, back before the next one comes: served as usual.
#[test]
fn tap_replaced_between_sessions() {
    let mut s = Setup::simple();
    s.disconnect(1);
    s.daemon.ns().ip(&["link", "del", TAP]).unwrap();
    s.daemon.wait_log("was deleted", 1, WAIT).unwrap();
    s.daemon
        .ns()
        .ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])
        .unwrap();
    s.daemon.wait_log("is back", 1, WAIT).unwrap();
    s.daemon
        .ns()
        .wait_for_interface(TAP, Some(&ip_text(HOST_IP)), WAIT)
        .unwrap();
    s.daemon
        .ns()
        .add_neighbour(TAP, &ip_text(GUEST_IP), &GUEST_MAC)
        .unwrap();
    s.out.dst_mac = s.daemon.tap_mac().unwrap();
    s.connect(Default::default(), 64, 2048);
    let peer = s.peer_udp(7403);
    s.udp_to_peer(0, &peer, b"new session, new tap");
}
