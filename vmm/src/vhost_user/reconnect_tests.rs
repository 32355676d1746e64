//! The reconnect thread and the link against a scripted backend on a real socket path: the
//! first connection dies mid-session, and what the second one is sent is checked.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::memory::RamRegion;
use crate::vhost_user::link::{lock, Link, Replay, Ring, SharedRam};
use crate::virtio::QueueConfig;

const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_ENABLE: u32 = 18;
const VERSION_1_AND_PROTOCOL: u64 = (1 << 32) | (1 << 30);

/// One message a backend connection received: (connection number, request, payload).
type Seen = (usize, u32, Vec<u8>);

/// Serves connections on `listener` one after another. Connection n offers `offers[n]` as its
/// virtio features (no protocol features); the first one is dropped (a crash) right after its
/// first SET_VRING_ENABLE. Every message goes to the channel.
fn backend(listener: UnixListener, offers: Vec<u64>) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (number, offer) in offers.into_iter().enumerate() {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            serve(&mut stream, number, offer, &tx);
        }
    });
    rx
}

fn serve(stream: &mut UnixStream, number: usize, offer: u64, tx: &mpsc::Sender<Seen>) {
    loop {
        let mut header = [0u8; 12];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(8) as usize];
        if stream.read_exact(&mut payload).is_err() {
            return;
        }
        let request = word(0);
        let _ = tx.send((number, request, payload));
        let reply = match request {
            GET_FEATURES => offer,
            GET_PROTOCOL_FEATURES => 0,
            SET_VRING_ENABLE if number == 0 => return,
            _ => continue,
        };
        let mut message = request.to_le_bytes().to_vec();
        message.extend_from_slice(&0x5u32.to_le_bytes());
        message.extend_from_slice(&8u32.to_le_bytes());
        message.extend_from_slice(&reply.to_le_bytes());
        if stream.write_all(&message).is_err() {
            return;
        }
    }
}

struct Fixture {
    link: SharedLink,
    kick: EventFd,
    call: EventFd,
    seen: mpsc::Receiver<Seen>,
    path: PathBuf,
    _dir: PathBuf,
}

/// A link to a backend whose connections offer `offers`, started with one ring whose used
/// index in guest memory is 7, with the reconnect thread running.
fn fixture(name: &str, replay: Replay, offers: Vec<u64>) -> Fixture {
    fixture_with(name, replay, offers, Some(None))
}

/// `reconnect`: `None`, no reconnect thread; `Some(give_up_after)`, one.
fn fixture_with(
    name: &str,
    replay: Replay,
    offers: Vec<u64>,
    reconnect: Option<Option<Duration>>,
) -> Fixture {
    let dir = std::env::temp_dir().join(format!("splitvmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("backend.sock");
    let seen = backend(UnixListener::bind(&path).unwrap(), offers);
    let needs = Requirements {
        num_queues: 1,
        config: false,
    };
    let connection = VhostUserConnection::connect(&path, needs).unwrap();
    let socket = connection.watch_socket().unwrap();
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let ring_config = QueueConfig {
        size: 64,
        desc: 0x1000,
        driver: 0x2000,
        device: 0x3000,
    };
    memory
        .write_obj(7u16.to_le(), GuestAddress(0x3002))
        .unwrap();
    let ram = SharedRam {
        memory,
        memfd: std::fs::File::open("/dev/null").unwrap(),
        regions: vec![RamRegion {
            guest_start: 0,
            size: 0x10000,
            file_offset: 0,
        }],
    };
    let link = Link::new(name.into(), connection, needs, replay, ram, 64);
    let link = Arc::new(Mutex::new(link));
    if let Some(give_up_after) = reconnect {
        spawn(link.clone(), socket, give_up_after).unwrap();
    }
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let ring = Ring {
        index: 0,
        config: ring_config,
        kick: kick.try_clone().unwrap(),
        call: call.try_clone().unwrap(),
        enabled: true,
    };
    lock(&link).start(VERSION_1_AND_PROTOCOL, vec![ring]);
    Fixture {
        link,
        kick,
        call,
        seen,
        path,
        _dir: dir,
    }
}

/// Messages of connection `number` up to and including its first `until`.
fn messages_until(seen: &mpsc::Receiver<Seen>, number: usize, until: u32) -> Vec<(u32, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let (n, request, payload) = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        if n == number {
            got.push((request, payload.clone()));
            if request == until {
                return got;
            }
        }
    }
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting until {what}");
}

#[test]
fn a_restarted_backend_gets_the_rings_back_at_the_used_index_and_a_kick() {
    let offers = vec![VERSION_1_AND_PROTOCOL; 2];
    let f = fixture("reconnect", Replay::LossTolerated, offers);
    messages_until(&f.seen, 0, SET_VRING_ENABLE);
    // The first backend "crashed" after enabling the ring; the second one gets everything
    // again: features, memory table, the ring (base = used index 7), its enable.
    let second = messages_until(&f.seen, 1, SET_VRING_ENABLE);
    let requests: Vec<u32> = second.iter().map(|(r, _)| *r).collect();
    // SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_FEATURES, SET_MEM_TABLE, then
    // NUM, BASE, ADDR, KICK, CALL, ENABLE.
    assert_eq!(requests, [3, 1, 15, 16, 2, 5, 8, 10, 9, 12, 13, 18]);
    let base = &second.iter().find(|(r, _)| *r == SET_VRING_BASE).unwrap().1;
    assert_eq!(&base[..8], &[0, 0, 0, 0, 7, 0, 0, 0], "queue 0, base 7");
    wait_until("the queue is kicked", || f.kick.read().is_ok());
    assert!(f.call.read().is_ok(), "the guest is interrupted once");
    let link = lock(&f.link);
    assert!(link.is_connected());
    assert!(!link.is_failed());
}

#[test]
fn a_backend_back_without_a_feature_fails_the_device() {
    let offers = vec![VERSION_1_AND_PROTOCOL | 1, VERSION_1_AND_PROTOCOL];
    let f = fixture("lost-feature", Replay::LossTolerated, offers);
    messages_until(&f.seen, 0, SET_VRING_ENABLE);
    wait_until("the device fails", || lock(&f.link).is_failed());
    assert!(!lock(&f.link).is_connected());
}

#[test]
fn a_disk_without_inflight_tracking_fails_instead_of_resuming() {
    let offers = vec![VERSION_1_AND_PROTOCOL; 2];
    let f = fixture("no-inflight", Replay::EveryRequest, offers);
    messages_until(&f.seen, 0, SET_VRING_ENABLE);
    wait_until("the device fails", || lock(&f.link).is_failed());
    // It never connected again.
    std::thread::sleep(Duration::from_millis(100));
    assert!(f.seen.try_iter().all(|(n, _, _)| n == 0));
    assert!(lock(&f.link).failed_flag().load(Ordering::Acquire));
}

#[test]
fn a_reset_and_restart_while_disconnected_go_to_the_next_backend() {
    let offers = vec![VERSION_1_AND_PROTOCOL; 2];
    let f = fixture_with("reset-away", Replay::LossTolerated, offers, None);
    messages_until(&f.seen, 0, SET_VRING_ENABLE);
    let mut link = lock(&f.link);
    assert_eq!(link.hung_up(), AfterHangUp::Reconnect);
    // The driver resets the device and starts it again with new rings, all while no backend
    // is there: nothing is sent, everything is kept.
    link.reset();
    let fresh = Ring {
        index: 0,
        config: QueueConfig {
            size: 32,
            desc: 0x5000,
            driver: 0x6000,
            device: 0x7000,
        },
        kick: f.kick.try_clone().unwrap(),
        call: f.call.try_clone().unwrap(),
        enabled: true,
    };
    link.start(VERSION_1_AND_PROTOCOL, vec![fresh]);
    let needs = link.requirements();
    link.take_over(VhostUserConnection::connect(&f.path, needs).unwrap())
        .unwrap();
    drop(link);
    let second = messages_until(&f.seen, 1, SET_VRING_ENABLE);
    let num = &second.iter().find(|(r, _)| *r == 8).unwrap().1;
    assert_eq!(&num[..8], &[0, 0, 0, 0, 32, 0, 0, 0], "the new ring's size");
    let base = &second.iter().find(|(r, _)| *r == SET_VRING_BASE).unwrap().1;
    assert_eq!(
        &base[..8],
        &[0; 8],
        "the new ring starts at its (zero) used index"
    );
    assert!(
        second.iter().all(|(r, _)| *r != 11),
        "no GET_VRING_BASE for the old rings"
    );
}

#[test]
fn reconnect_ms_gives_up_on_a_backend_that_never_returns() {
    // One connection only: after the crash nothing accepts on the path.
    let offers = vec![VERSION_1_AND_PROTOCOL];
    let give_up = Some(Duration::from_millis(300));
    let f = fixture_with("give-up", Replay::LossTolerated, offers, Some(give_up));
    messages_until(&f.seen, 0, SET_VRING_ENABLE);
    assert!(!lock(&f.link).is_failed(), "not at once");
    wait_until("the device fails", || lock(&f.link).is_failed());
}
