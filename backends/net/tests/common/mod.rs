//! What the protocol tests share: a daemon in its own namespace, a guest-less frontend on it
//! with receive buffers posted, the guest's and the host's addresses, and peer sockets in the
//! namespace.
#![allow(dead_code)]

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use splitvmm_tests::vhost::net::daemon::{
    NetDaemon, NetDaemonOptions, GUEST_IP, GUEST_MAC, HOST_IP,
};
use splitvmm_tests::vhost::net::packet::{self, Endpoints, Parsed};
use splitvmm_tests::vhost::net::{NetFrontend, NetOptions, RxFrame};

pub const WAIT: Duration = Duration::from_secs(5);

pub fn deadline() -> Instant {
    Instant::now() + WAIT
}

pub struct Setup {
    // Field order: the frontend hangs up before the daemon dies.
    pub conn: Option<NetFrontend>,
    pub daemon: NetDaemon,
    /// Guest → host addresses.
    pub out: Endpoints,
}

impl Setup {
    /// A daemon with `dopts`, a frontend with `nopts`, and `rx_buffers` buffers of `rx_len`
    /// bytes posted on every RX queue.
    pub fn new(
        dopts: &NetDaemonOptions,
        nopts: NetOptions,
        rx_buffers: usize,
        rx_len: u64,
    ) -> Self {
        let daemon =
            NetDaemon::start(dopts).unwrap_or_else(|e| panic!("starting splitvmm-net: {e}"));
        let mut dev = NetFrontend::connect(daemon.socket(), nopts)
            .unwrap_or_else(|e| panic!("connecting: {e}\n{}", daemon.stderr()));
        for p in dev.pairs_mut() {
            p.rx.post(rx_buffers, rx_len).expect("posting RX buffers");
        }
        let tap_mac = daemon.tap_mac().expect("tap MAC");
        Setup {
            conn: Some(dev),
            daemon,
            out: Endpoints {
                src_mac: GUEST_MAC,
                dst_mac: tap_mac,
                src_ip: GUEST_IP,
                dst_ip: HOST_IP,
            },
        }
    }

    /// The frontend (panics after [`Self::disconnect`]).
    pub fn dev(&mut self) -> &mut NetFrontend {
        self.conn.as_mut().expect("connected")
    }

    /// Hangs up and waits for the daemon to log the end of session `session`.
    pub fn disconnect(&mut self, session: u32) {
        self.conn = None;
        self.daemon
            .wait_log(
                &format!("session {session}: frontend disconnected"),
                1,
                WAIT,
            )
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Connects a new frontend (after [`Self::disconnect`]) with `rx_buffers` posted per pair.
    pub fn connect(&mut self, nopts: NetOptions, rx_buffers: usize, rx_len: u64) {
        let mut dev = NetFrontend::connect(self.daemon.socket(), nopts)
            .unwrap_or_else(|e| panic!("connecting: {e}\n{}", self.daemon.stderr()));
        for p in dev.pairs_mut() {
            p.rx.post(rx_buffers, rx_len).expect("posting RX buffers");
        }
        self.conn = Some(dev);
    }

    pub fn simple() -> Self {
        Self::new(
            &NetDaemonOptions::default(),
            NetOptions::default(),
            128,
            2048,
        )
    }

    /// A UDP socket in the daemon's namespace bound to the host address and `port`.
    pub fn peer_udp(&self, port: u16) -> UdpSocket {
        let sock = self
            .daemon
            .ns()
            .enter(move || UdpSocket::bind(SocketAddrV4::new(HOST_IP.into(), port)))
            .expect("entering the namespace")
            .expect("binding the peer socket");
        sock.set_read_timeout(Some(WAIT)).expect("timeout");
        sock
    }

    /// Receives frames on pair `pair` until one matches `want`.
    pub fn recv_matching(
        &mut self,
        pair: usize,
        want: impl Fn(&Parsed) -> bool,
    ) -> (RxFrame, Parsed) {
        let end = deadline();
        loop {
            let frame = self
                .dev()
                .pair(pair)
                .rx
                .recv(end)
                .unwrap_or_else(|e| panic!("receiving: {e}\n{}", self.daemon.stderr()));
            // Other traffic (IPv6 router solicitations, ...) is skipped.
            if let Some(p) = packet::parse(&frame.data) {
                if want(&p) {
                    return (frame, p);
                }
            }
        }
    }
}

impl Setup {
    /// Receives frames on any pair until one matches `want` (the host picks the RX queue).
    pub fn recv_any(&mut self, want: impl Fn(&Parsed) -> bool) -> (usize, Parsed) {
        let end = deadline();
        loop {
            for (i, p) in self.dev().pairs_mut().iter_mut().enumerate() {
                let got =
                    p.rx.try_recv(end)
                        .unwrap_or_else(|e| panic!("receiving on pair {i}: {e}"));
                if let Some(parsed) = got.and_then(|f| packet::parse(&f.data)) {
                    if want(&parsed) {
                        return (i, parsed);
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "no matching frame on any pair\n{}",
                self.daemon.stderr()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends a UDP datagram from the guest on `pair` to the peer socket, which must get it.
    pub fn udp_to_peer(&mut self, pair: usize, peer: &UdpSocket, payload: &[u8]) {
        let port = peer.local_addr().expect("peer address").port();
        let f = packet::udp_frame(&self.out, 5000, port, payload, packet::UdpCsum::Full);
        let tx = &mut self.dev().pair(pair).tx;
        tx.send(&splitvmm_tests::vhost::net::NetHeader::plain(), &f)
            .expect("sending");
        tx.wait_all(deadline()).expect("TX completion");
        let mut buf = vec![0u8; payload.len() + 16];
        let n = peer.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "peer receiving on pair {pair}: {e}\n{}",
                self.daemon.stderr()
            )
        });
        assert!(
            buf[..n] == *payload,
            "pair {pair}: the peer got {n} bytes starting {:?}, not the {} sent",
            &buf[..n.min(16)],
            payload.len()
        );
    }
}
