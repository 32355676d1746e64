//! The link from one device to its backend: the connection, which comes and goes when the
//! backend restarts, and everything the VMM handed the backend that the next connection must
//! get again — negotiated features, guest RAM, each started ring (size, addresses, kick and
//! call eventfds, enabled or not) and the in-flight buffer. Every message to the backend goes
//! through here, under one lock, so the vCPU that starts or resets the device, a NIC's control
//! queue and the reconnect thread never interleave on the socket.
//!
//! A message that fails does not fail the device: the socket is shut down, the hang-up watcher
//! wakes and reconnects ([`super::reconnect`]), and the new connection gets the whole state.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::frontend::{Requirements, VhostUserConnection, VhostUserError};
use crate::memory::RamRegion;
use crate::virtio::QueueConfig;

/// VIRTIO_F_IN_ORDER: the device uses buffers in the order they were made available.
pub const VIRTIO_F_IN_ORDER: u32 = 35;

#[derive(Debug, Error)]
pub enum LinkError {
    /// The new backend cannot serve what the guest was promised: the device must fail.
    #[error(
        "the backend at {path} came back without features the device was started with \
         (virtio {virtio:#x}, protocol {protocol:#x})"
    )]
    FeaturesLost {
        path: PathBuf,
        virtio: u64,
        protocol: u64,
    },
    /// A message on the new connection failed; another connection may do better.
    #[error(transparent)]
    Message(#[from] VhostUserError),
    #[error("cannot duplicate queue {queue}'s eventfd for {path}: {source}")]
    EventFd {
        path: PathBuf,
        queue: u16,
        source: std::io::Error,
    },
}

/// What a backend's restart may cost the guest, decided by the device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// A lost request is a lost packet, which the guest's protocols recover (a NIC).
    LossTolerated,
    /// Every request must complete (a disk): only a backend that tracks in-flight requests
    /// (INFLIGHT_SHMFD), or an in-order device, can be resumed at the used index.
    EveryRequest,
}

/// Guest RAM as every backend gets it.
pub struct SharedRam {
    pub memory: GuestMemoryMmap,
    pub memfd: File,
    pub regions: Vec<RamRegion>,
}

/// One ring handed to the backend.
pub struct Ring {
    pub index: u16,
    pub config: QueueConfig,
    pub kick: EventFd,
    pub call: EventFd,
    pub enabled: bool,
}

/// What the driver started (DRIVER_OK) and has not reset since.
struct Session {
    features: u64,
    rings: Vec<Ring>,
}

/// What the reconnect thread should do about a connection that went away.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterHangUp {
    Reconnect,
    /// Resuming would lose or repeat requests the guest cannot tolerate: why.
    Fail(String),
}

pub struct Link {
    name: String,
    path: PathBuf,
    needs: Requirements,
    replay: Replay,
    connection: Option<VhostUserConnection>,
    /// What the first backend offered: the guest's features were derived from these, so every
    /// later backend must offer them all.
    first_features: u64,
    first_protocol: VhostUserProtocolFeatures,
    /// Whether the running session's connection tracks in-flight requests.
    tracked: bool,
    ram: SharedRam,
    num_queues: u16,
    queue_size: u16,
    session: Option<Session>,
    /// The in-flight buffer from GET_INFLIGHT_FD, kept across reconnects and dropped when the
    /// driver resets the device (the next start asks for a fresh one).
    inflight: Option<(VhostUserInflight, File)>,
    failed: Arc<AtomicBool>,
}

/// The link, shared by the device, a NIC's control queue and the reconnect thread.
pub type SharedLink = Arc<Mutex<Link>>;

/// Locks the link; a panic elsewhere while holding it leaves nothing half-sent that matters
/// more than the panic itself (a half-sent message shows up as a failed reply and a reconnect).
pub fn lock(link: &SharedLink) -> MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    /// A link over the first, negotiated `connection`.
    pub fn new(
        name: String,
        connection: VhostUserConnection,
        needs: Requirements,
        replay: Replay,
        ram: SharedRam,
        queue_size: u16,
    ) -> Self {
        Link {
            name,
            path: connection.path().to_owned(),
            needs,
            replay,
            first_features: connection.backend_features(),
            first_protocol: connection.protocol(),
            tracked: connection.tracks_inflight(),
            connection: Some(connection),
            ram,
            num_queues: needs.num_queues,
            queue_size,
            session: None,
            inflight: None,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn requirements(&self) -> Requirements {
        self.needs
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.ram.memory
    }

    /// The flag the transport reads on every status poll, without taking the lock.
    pub fn failed_flag(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    /// Marks the device failed for good and drops the connection.
    pub fn fail(&mut self) {
        self.failed.store(true, Ordering::Release);
        self.drop_connection();
    }

    /// The driver set DRIVER_OK: hands `rings` to the backend if one is connected, and keeps
    /// them for every later connection.
    pub fn start(&mut self, features: u64, rings: Vec<Ring>) {
        self.session = Some(Session { features, rings });
        if self.connection.is_some() {
            if let Err(error) = self.hand_over(false) {
                log::warn!(
                    "{}: cannot start the rings on the backend: {error}; reconnecting",
                    self.name
                );
            }
        }
    }

    /// SET_VRING_ENABLE, remembered for the next connection; sent if one is up.
    pub fn enable_vring(&mut self, index: u16, enable: bool) {
        if let Some(ring) = self
            .session
            .as_mut()
            .and_then(|s| s.rings.iter_mut().find(|r| r.index == index))
        {
            ring.enabled = enable;
        }
        let sent = match self.connection.as_mut() {
            Some(connection) => connection.enable_vring(index, enable),
            None => return,
        };
        if let Err(error) = sent {
            self.lost(&error);
        }
    }

    /// The driver reset the device: stops the rings on a live backend and forgets them.
    pub fn reset(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // A fresh start after a reset gets a fresh in-flight buffer: nothing from before the
        // reset may be replayed into the driver's new rings.
        self.inflight = None;
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let mut stopped = Ok(());
        for ring in &session.rings {
            stopped = connection
                .enable_vring(ring.index, false)
                .and_then(|()| connection.get_vring_base(ring.index).map(|_| ()));
            if stopped.is_err() {
                break;
            }
        }
        if let Err(error) = stopped {
            self.lost(&error);
        }
    }

    /// The connection went away (hang-up or a failed message): decides whether the device can
    /// be resumed on a new one.
    pub fn hung_up(&mut self) -> AfterHangUp {
        self.drop_connection();
        if self.is_failed() {
            return AfterHangUp::Fail("the device had already failed".into());
        }
        match &self.session {
            Some(session) if self.replay == Replay::EveryRequest => {
                replay_verdict(self.tracked, session.features)
            }
            _ => AfterHangUp::Reconnect,
        }
    }

    /// Takes over a new, negotiated connection to a restarted backend: checks it offers what
    /// the first one did, then hands it the running session and kicks every ring.
    pub fn take_over(&mut self, connection: VhostUserConnection) -> Result<(), LinkError> {
        let virtio = self.first_features & !connection.backend_features();
        let protocol = (self.first_protocol - connection.protocol()).bits();
        if virtio != 0 || protocol != 0 {
            return Err(LinkError::FeaturesLost {
                path: self.path.clone(),
                virtio,
                protocol,
            });
        }
        self.connection = Some(connection);
        self.hand_over(true).map_err(LinkError::from)
    }

    /// Sends the session (if any) to the connected backend; on a failed message, drops the
    /// connection, which the reconnect thread notices.
    fn hand_over(&mut self, resume: bool) -> Result<(), VhostUserError> {
        let sent = self.send_session(resume);
        if sent.is_err() {
            self.drop_connection();
        }
        sent
    }

    /// QEMU's order: SET_FEATURES, the in-flight buffer (GET only the first time), the memory
    /// table, per ring NUM/BASE/ADDR/KICK/CALL, then the enables. `resume`: the rings were
    /// running under an earlier backend, so each restarts at the used index in guest memory
    /// and is kicked (requests made available meanwhile) and its interrupt raised (a
    /// completion published by the old backend just before it died may not have been
    /// signalled; a spurious one costs the driver a look at the used ring).
    fn send_session(&mut self, resume: bool) -> Result<(), VhostUserError> {
        // Both were checked by the caller; the early returns keep this free of unwraps.
        let (Some(connection), Some(session)) = (self.connection.as_mut(), self.session.as_ref())
        else {
            return Ok(());
        };
        connection.set_features(session.features)?;
        self.tracked = connection.tracks_inflight();
        if self.tracked {
            if self.inflight.is_none() {
                self.inflight = Some(connection.get_inflight_fd(self.num_queues, self.queue_size)?);
            }
            if let Some((info, file)) = &self.inflight {
                connection.set_inflight_fd(info, file)?;
            }
        }
        connection.set_mem_table(&self.ram.memory, &self.ram.memfd, &self.ram.regions)?;
        for ring in &session.rings {
            let base = if resume {
                used_index(&self.ram.memory, &ring.config).ok_or_else(|| {
                    VhostUserError::RingOutsideRam {
                        path: self.path.clone(),
                        queue: ring.index,
                        what: "used",
                        address: ring.config.device,
                    }
                })?
            } else {
                0
            };
            connection.setup_vring(
                ring.index,
                &ring.config,
                base,
                &self.ram.memory,
                &ring.kick,
                &ring.call,
            )?;
        }
        for ring in session.rings.iter().filter(|r| r.enabled) {
            connection.enable_vring(ring.index, true)?;
        }
        if resume {
            for ring in &session.rings {
                // Eventfd writes only fail when the counter would overflow, i.e. when it is
                // already signalled, which is what is wanted.
                let _ = ring.kick.write(1);
                let _ = ring.call.write(1);
            }
        }
        Ok(())
    }

    fn lost(&mut self, error: &VhostUserError) {
        log::warn!(
            "{}: {error}; dropping the connection to reconnect",
            self.name
        );
        self.drop_connection();
    }

    /// Shuts the socket down (which wakes the hang-up watcher) and forgets the connection.
    fn drop_connection(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.shut_down();
        }
    }
}

/// Whether a disk whose backend went away mid-session can be resumed without losing a
/// request: with in-flight tracking the new backend resubmits what the old one had fetched;
/// with in-order completion everything below the used index completed and everything above
/// it is fetched again; otherwise a request completed out of order would be skipped.
pub fn replay_verdict(tracked: bool, features: u64) -> AfterHangUp {
    if tracked || features & (1 << VIRTIO_F_IN_ORDER) != 0 {
        AfterHangUp::Reconnect
    } else {
        AfterHangUp::Fail(
            "the backend does not track in-flight requests (no VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) \
             and VIRTIO_F_IN_ORDER was not negotiated, so resuming could lose requests"
                .into(),
        )
    }
}

/// The used ring's index (`struct virtq_used`: flags, then idx), where a restarted backend
/// resumes: what the driver has seen completed.
fn used_index(memory: &GuestMemoryMmap, config: &QueueConfig) -> Option<u16> {
    let at = config.device.checked_add(2)?;
    memory
        .read_obj::<u16>(GuestAddress(at))
        .ok()
        .map(u16::from_le)
}

/// Duplicates a ring's eventfds for the link to keep.
pub fn ring(
    path: &Path,
    index: u16,
    config: QueueConfig,
    kick: &EventFd,
    call: &EventFd,
    enabled: bool,
) -> Result<Ring, LinkError> {
    let dup = |fd: &EventFd| {
        fd.try_clone().map_err(|source| LinkError::EventFd {
            path: path.to_owned(),
            queue: index,
            source,
        })
    };
    Ok(Ring {
        index,
        config,
        kick: dup(kick)?,
        call: dup(call)?,
        enabled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_resume_only_when_nothing_can_be_lost() {
        assert_eq!(replay_verdict(true, 0), AfterHangUp::Reconnect);
        assert_eq!(
            replay_verdict(false, 1 << VIRTIO_F_IN_ORDER),
            AfterHangUp::Reconnect
        );
        match replay_verdict(false, 1 << 32) {
            AfterHangUp::Fail(why) => assert!(why.contains("INFLIGHT_SHMFD")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn used_index_is_read_from_the_used_ring() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        memory
            .write_obj(0x1234u16.to_le(), GuestAddress(0x1002))
            .unwrap();
        let config = QueueConfig {
            size: 256,
            desc: 0,
            driver: 0x800,
            device: 0x1000,
        };
        assert_eq!(used_index(&memory, &config), Some(0x1234));
        let outside = QueueConfig {
            device: 0x4000,
            ..config
        };
        assert_eq!(used_index(&memory, &outside), None);
    }
}
