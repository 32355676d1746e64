//! The virtio-net control queue, served by the VMM itself: the one queue of a vhost-user NIC
//! that is not handed to the backend. Its commands are control-plane only: the driver's choice
//! of how many queue pairs to use becomes SET_VRING_ENABLE on the backend's rings; everything
//! else is refused (nothing that needs it is offered). The thread reads only the small command
//! buffers the driver puts on this queue, never packet data.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::link::{lock, SharedLink};
use crate::virtio::QueueConfig;

const VIRTIO_NET_CTRL_MQ: u8 = 4;
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;
/// Longest command accepted (a MAC table would be longer, but none is offered).
const MAX_COMMAND: usize = 4096;

/// The running control queue; stops when dropped.
pub struct ControlQueue {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// What the thread needs to serve the queue.
pub struct ControlQueueSetup {
    pub name: String,
    pub config: QueueConfig,
    pub event_idx: bool,
    pub memory: GuestMemoryMmap,
    pub kick: EventFd,
    pub call: EventFd,
    pub link: SharedLink,
    pub max_pairs: u16,
}

impl ControlQueue {
    pub fn start(setup: ControlQueueSetup) -> std::io::Result<Self> {
        let mut queue = Queue::new(setup.config.size)
            .map_err(|error| std::io::Error::other(format!("control queue: {error:?}")))?;
        queue.set_size(setup.config.size);
        queue
            .try_set_desc_table_address(GuestAddress(setup.config.desc))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(setup.config.driver)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(setup.config.device)))
            .map_err(|error| std::io::Error::other(format!("control queue: {error:?}")))?;
        queue.set_event_idx(setup.event_idx);
        queue.set_ready(true);
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_thread = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("net-ctrl".into())
            .spawn(move || serve(setup, queue, &stop_thread))?;
        Ok(ControlQueue {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlQueue {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(setup: ControlQueueSetup, mut queue: Queue, stop: &EventFd) {
    loop {
        // SAFETY: both eventfds are owned by this thread's caller (`setup`, `stop`) and outlive
        // the borrows, which end with this loop iteration.
        let (kick, stop_fd) = unsafe {
            (
                BorrowedFd::borrow_raw(setup.kick.as_raw_fd()),
                BorrowedFd::borrow_raw(stop.as_raw_fd()),
            )
        };
        let mut fds = [
            PollFd::new(kick, PollFlags::POLLIN),
            PollFd::new(stop_fd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => {
                log::error!("{}: control queue stopped: {error}", setup.name);
                return;
            }
        }
        if fds[1].any().unwrap_or(false) {
            return;
        }
        // Non-blocking: a spurious wake-up finds nothing to read.
        let _ = setup.kick.read();
        let mut served = false;
        while let Some(chain) = queue.pop_descriptor_chain(&setup.memory) {
            let head = chain.head_index();
            let mut command = Vec::new();
            let mut status_at = None;
            for descriptor in chain {
                if descriptor.is_write_only() {
                    status_at.get_or_insert(descriptor.addr());
                } else if command.len() + descriptor.len() as usize <= MAX_COMMAND {
                    let mut bytes = vec![0u8; descriptor.len() as usize];
                    if setup
                        .memory
                        .read_slice(&mut bytes, descriptor.addr())
                        .is_ok()
                    {
                        command.extend_from_slice(&bytes);
                    }
                }
            }
            let ack = handle(&setup, &command);
            let written = match status_at {
                Some(at) if setup.memory.write_obj(ack, at).is_ok() => 1,
                _ => 0,
            };
            if let Err(error) = queue.add_used(&setup.memory, head, written) {
                log::error!("{}: control queue: {error:?}", setup.name);
                return;
            }
            served = true;
        }
        if served && queue.needs_notification(&setup.memory).unwrap_or(true) {
            let _ = setup.call.write(1);
        }
    }
}

/// Carries out one command; returns the ack byte.
fn handle(setup: &ControlQueueSetup, command: &[u8]) -> u8 {
    match command {
        [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, low, high, ..] => {
            let pairs = u16::from_le_bytes([*low, *high]);
            if !(1..=setup.max_pairs).contains(&pairs) {
                log::warn!("{}: driver asked for {pairs} queue pairs", setup.name);
                return VIRTIO_NET_ERR;
            }
            // Remembered by the link for a restarted backend; a failed message there means a
            // reconnect, not a refused command.
            let mut link = lock(&setup.link);
            for pair in 0..setup.max_pairs {
                let enable = pair < pairs;
                for queue in [2 * pair, 2 * pair + 1] {
                    link.enable_vring(queue, enable);
                }
            }
            log::info!(
                "{}: {pairs} of {} queue pairs enabled",
                setup.name,
                setup.max_pairs
            );
            VIRTIO_NET_OK
        }
        [class, command, ..] => {
            log::debug!("{}: refusing control command {class}/{command}", setup.name);
            VIRTIO_NET_ERR
        }
        _ => VIRTIO_NET_ERR,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::vhost_user::frontend::{Requirements, VhostUserConnection};
    use crate::vhost_user::link::{Link, Replay, SharedRam};

    const GET_FEATURES: u32 = 1;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const GET_QUEUE_NUM: u32 = 17;
    const SET_VRING_ENABLE: u32 = 18;

    /// A backend that negotiates (VERSION_1, PROTOCOL_FEATURES; CONFIG and MQ; 4 queues) and
    /// records every SET_VRING_ENABLE as (queue, enabled) until the frontend goes away.
    fn backend(mut stream: UnixStream) -> std::thread::JoinHandle<Vec<(u32, bool)>> {
        std::thread::spawn(move || {
            let mut enables = Vec::new();
            loop {
                let mut header = [0u8; 12];
                if stream.read_exact(&mut header).is_err() {
                    return enables;
                }
                let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
                let mut payload = vec![0u8; word(8) as usize];
                stream.read_exact(&mut payload).unwrap();
                let reply = match word(0) {
                    GET_FEATURES => (1u64 << 32) | (1 << 30),
                    // CONFIG (9) and MQ (0).
                    GET_PROTOCOL_FEATURES => (1 << 9) | 1,
                    GET_QUEUE_NUM => 4,
                    SET_VRING_ENABLE => {
                        let field =
                            |i: usize| u32::from_le_bytes(payload[i..i + 4].try_into().unwrap());
                        enables.push((field(0), field(4) == 1));
                        continue;
                    }
                    _ => continue,
                };
                let mut message = word(0).to_le_bytes().to_vec();
                message.extend_from_slice(&0x5u32.to_le_bytes());
                message.extend_from_slice(&8u32.to_le_bytes());
                message.extend_from_slice(&reply.to_le_bytes());
                stream.write_all(&message).unwrap();
            }
        })
    }

    #[test]
    fn queue_pairs_command_enables_and_disables_rings() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let recorder = backend(theirs);
        let needs = Requirements {
            num_queues: 4,
            config: true,
        };
        let mut connection =
            VhostUserConnection::handshake(ours, Path::new("pair"), needs).unwrap();
        // As at DRIVER_OK: the crate sends SET_VRING_ENABLE only once features are set.
        connection.set_features(0).unwrap();
        let setup = ControlQueueSetup {
            name: "nic".into(),
            config: QueueConfig {
                size: 64,
                desc: 0,
                driver: 0,
                device: 0,
            },
            event_idx: false,
            memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
            link: Arc::new(Mutex::new(Link::new(
                "nic".into(),
                connection,
                needs,
                Replay::LossTolerated,
                SharedRam {
                    memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
                    memfd: std::fs::File::open("/dev/null").unwrap(),
                    regions: Vec::new(),
                },
                64,
            ))),
            max_pairs: 2,
        };
        assert_eq!(
            handle(&setup, &[VIRTIO_NET_CTRL_MQ, 0, 2, 0]),
            VIRTIO_NET_OK
        );
        assert_eq!(
            handle(&setup, &[VIRTIO_NET_CTRL_MQ, 0, 1, 0]),
            VIRTIO_NET_OK
        );
        // More pairs than there are, zero pairs, other classes, short commands: refused.
        assert_eq!(
            handle(&setup, &[VIRTIO_NET_CTRL_MQ, 0, 3, 0]),
            VIRTIO_NET_ERR
        );
        assert_eq!(
            handle(&setup, &[VIRTIO_NET_CTRL_MQ, 0, 0, 0]),
            VIRTIO_NET_ERR
        );
        assert_eq!(handle(&setup, &[0, 0, 1]), VIRTIO_NET_ERR);
        assert_eq!(handle(&setup, &[VIRTIO_NET_CTRL_MQ]), VIRTIO_NET_ERR);
        drop(setup);
        let enables = recorder.join().unwrap();
        let two = [(0, true), (1, true), (2, true), (3, true)];
        let one = [(0, true), (1, true), (2, false), (3, false)];
        assert_eq!(enables, [&two[..], &one[..]].concat());
    }
}
