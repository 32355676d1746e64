//! The vhost-user control channel, frontend side, over the `vhost` crate's [`Frontend`]:
//! connecting, feature and protocol-feature negotiation, the memory table, GET_CONFIG, and
//! starting and stopping vrings — in QEMU's message order.
//!
//! Every reply is untrusted: the socket has send and receive timeouts, so a backend that stops
//! answering fails the call instead of hanging the vCPU that triggered it; the `vhost` crate
//! checks message framing, and sizes are checked here.

use std::fs::File;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::RamRegion;
use crate::virtio::{QueueConfig, VIRTIO_F_VERSION_1};

/// How long one control message (send and reply) may take.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum VhostUserError {
    #[error("cannot connect to the vhost-user socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the vhost-user socket {path}: {source}")]
    SocketOptions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vhost-user backend at {path}: {what} failed: {source}")]
    Message {
        path: PathBuf,
        what: &'static str,
        source: vhost::Error,
    },
    #[error("vhost-user backend at {path} lacks feature {feature}, which {why}")]
    MissingFeature {
        path: PathBuf,
        feature: &'static str,
        why: &'static str,
    },
    #[error("vhost-user backend at {path} has {backend} queues, {wanted} asked for")]
    TooFewQueues {
        path: PathBuf,
        wanted: u16,
        backend: u64,
    },
    #[error("vhost-user backend at {path} answered GET_CONFIG with {got} bytes, {want} asked for")]
    ShortConfig {
        path: PathBuf,
        got: usize,
        want: usize,
    },
    #[error("vhost-user backend at {path}: queue {queue}'s {what} ring at {address:#x} is not in guest RAM")]
    RingOutsideRam {
        path: PathBuf,
        queue: u16,
        what: &'static str,
        address: u64,
    },
    #[error("vhost-user backend at {path} answered GET_INFLIGHT_FD with an empty buffer")]
    EmptyInflight { path: PathBuf },
    #[error("cannot share guest RAM with the vhost-user backend at {path}: {source}")]
    Memory {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the device needs from the protocol beyond the basics.
#[derive(Debug, Clone, Copy)]
pub struct Requirements {
    pub num_queues: u16,
    /// GET_CONFIG is needed (block: capacity and geometry live there).
    pub config: bool,
}

/// A connected, negotiated backend.
pub struct VhostUserConnection {
    path: PathBuf,
    frontend: Frontend,
    /// A second handle on the socket, for the hang-up watcher.
    watch: UnixStream,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
}

impl VhostUserConnection {
    /// Connects to `path` and negotiates: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
    /// GET_QUEUE_NUM. Fails naming the feature when the backend lacks one `needs` requires.
    pub fn connect(path: &Path, needs: Requirements) -> Result<Self, VhostUserError> {
        let stream = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Self::handshake(stream, path, needs)
    }

    /// Like [`Self::connect`] on an already connected `stream` (`path` names it in errors).
    pub fn handshake(
        stream: UnixStream,
        path: &Path,
        needs: Requirements,
    ) -> Result<Self, VhostUserError> {
        let setup = |source| VhostUserError::SocketOptions {
            path: path.to_owned(),
            source,
        };
        stream
            .set_read_timeout(Some(MESSAGE_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(MESSAGE_TIMEOUT)))
            .map_err(setup)?;
        let watch = stream.try_clone().map_err(setup)?;
        let frontend = Frontend::from_stream(stream, u64::from(needs.num_queues.max(1)));
        let mut connection = VhostUserConnection {
            path: path.to_owned(),
            frontend,
            watch,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
        };
        connection.negotiate(needs)?;
        Ok(connection)
    }

    fn message(&self, what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError + '_ {
        move |source| VhostUserError::Message {
            path: self.path.clone(),
            what,
            source,
        }
    }

    fn missing(&self, feature: &'static str, why: &'static str) -> VhostUserError {
        VhostUserError::MissingFeature {
            path: self.path.clone(),
            feature,
            why,
        }
    }

    fn negotiate(&mut self, needs: Requirements) -> Result<(), VhostUserError> {
        self.frontend
            .set_owner()
            .map_err(self.message("SET_OWNER"))?;
        let features = self
            .frontend
            .get_features()
            .map_err(self.message("GET_FEATURES"))?;
        self.backend_features = features;
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(self.missing(
                "VIRTIO_F_VERSION_1",
                "the virtio-pci modern transport needs",
            ));
        }
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(self.missing(
                "VHOST_USER_F_PROTOCOL_FEATURES",
                "splitvmm needs for GET_CONFIG and SET_VRING_ENABLE",
            ));
        }
        let offered = self
            .frontend
            .get_protocol_features()
            .map_err(self.message("GET_PROTOCOL_FEATURES"))?;
        if needs.config && !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(self.missing(
                "VHOST_USER_PROTOCOL_F_CONFIG",
                "the device needs to read its config space",
            ));
        }
        if needs.num_queues > 1 && !offered.contains(VhostUserProtocolFeatures::MQ) {
            return Err(self.missing("VHOST_USER_PROTOCOL_F_MQ", "num_queues above 1 needs"));
        }
        // INFLIGHT_SHMFD: the backend keeps track of what it has fetched in a buffer the VMM
        // holds, so a restarted backend resubmits it (what makes a block device reconnectable).
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        self.protocol = offered & wanted;
        self.frontend
            .set_protocol_features(self.protocol)
            .map_err(self.message("SET_PROTOCOL_FEATURES"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            let backend = self
                .frontend
                .get_queue_num()
                .map_err(self.message("GET_QUEUE_NUM"))?;
            if backend < u64::from(needs.num_queues) {
                return Err(VhostUserError::TooFewQueues {
                    path: self.path.clone(),
                    wanted: needs.num_queues,
                    backend,
                });
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The virtio feature bits the backend offered (VHOST_USER_F_PROTOCOL_FEATURES included).
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// The protocol features both sides agreed on.
    pub fn protocol(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Whether the backend tracks in-flight requests in a VMM-held buffer (INFLIGHT_SHMFD).
    pub fn tracks_inflight(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// Runs a message that has no reply of its own with NEED_REPLY when REPLY_ACK was
    /// negotiated, so a backend's refusal surfaces at the message that caused it.
    fn acked<T>(
        &mut self,
        what: &'static str,
        send: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, VhostUserError> {
        let ack = self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if ack {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let result = send(&mut self.frontend);
        if ack {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        result.map_err(self.message(what))
    }

    /// GET_CONFIG: `size` bytes of the device's config space from offset 0.
    pub fn get_config(&mut self, size: u32) -> Result<Vec<u8>, VhostUserError> {
        let zeros = vec![0u8; size as usize];
        let (_, payload) = self
            .frontend
            .get_config(0, size, VhostUserConfigFlags::empty(), &zeros)
            .map_err(self.message("GET_CONFIG"))?;
        if payload.len() != zeros.len() {
            return Err(VhostUserError::ShortConfig {
                path: self.path.clone(),
                got: payload.len(),
                want: zeros.len(),
            });
        }
        Ok(payload)
    }

    /// SET_FEATURES with what the driver acked that the backend offered, plus
    /// VHOST_USER_F_PROTOCOL_FEATURES (which keeps rings disabled until SET_VRING_ENABLE).
    pub fn set_features(&mut self, driver_features: u64) -> Result<(), VhostUserError> {
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = (driver_features & self.backend_features) | protocol;
        self.acked("SET_FEATURES", |f| f.set_features(features))
    }

    /// SET_MEM_TABLE with every RAM region: the memfd, where each region sits in the guest, in
    /// the file and in the VMM's address space.
    pub fn set_mem_table(
        &mut self,
        memory: &GuestMemoryMmap,
        memfd: &File,
        regions: &[RamRegion],
    ) -> Result<(), VhostUserError> {
        let mut table = Vec::with_capacity(regions.len());
        for region in regions {
            let host = memory
                .get_host_address(GuestAddress(region.guest_start))
                .map_err(|error| VhostUserError::Memory {
                    path: self.path.clone(),
                    source: std::io::Error::other(error.to_string()),
                })?;
            table.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.guest_start,
                memory_size: region.size,
                userspace_addr: host as u64,
                mmap_offset: region.file_offset,
                mmap_handle: memfd.as_raw_fd(),
            });
        }
        self.acked("SET_MEM_TABLE", |f| f.set_mem_table(&table).map(|_| ()))
    }

    /// GET_INFLIGHT_FD: a fresh in-flight buffer for `num_queues` rings of `queue_size`.
    pub fn get_inflight_fd(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(VhostUserInflight, File), VhostUserError> {
        let ask = VhostUserInflight::new(0, 0, num_queues, queue_size);
        let (info, file) = self
            .frontend
            .get_inflight_fd(&ask)
            .map_err(self.message("GET_INFLIGHT_FD"))?;
        if info.mmap_size == 0 || info.num_queues == 0 || info.queue_size == 0 {
            return Err(VhostUserError::EmptyInflight {
                path: self.path.clone(),
            });
        }
        Ok((info, file))
    }

    /// SET_INFLIGHT_FD: hands the backend the buffer kept since GET_INFLIGHT_FD.
    pub fn set_inflight_fd(
        &mut self,
        info: &VhostUserInflight,
        file: &File,
    ) -> Result<(), VhostUserError> {
        // The crate always waits for the backend's ack of this message.
        self.frontend
            .set_inflight_fd(info, file.as_raw_fd())
            .map_err(self.message("SET_INFLIGHT_FD"))
    }

    /// SET_VRING_NUM, SET_VRING_BASE (`base`: 0 for a fresh ring, the used index in guest
    /// memory for a ring a restarted backend takes over), SET_VRING_ADDR (VMM addresses of the
    /// three areas), SET_VRING_KICK and SET_VRING_CALL for one queue.
    pub fn setup_vring(
        &mut self,
        index: u16,
        queue: &QueueConfig,
        base: u16,
        memory: &GuestMemoryMmap,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), VhostUserError> {
        let host = |what: &'static str, address: u64| {
            memory
                .get_host_address(GuestAddress(address))
                .map(|host| host as u64)
                .map_err(|_| VhostUserError::RingOutsideRam {
                    path: self.path.clone(),
                    queue: index,
                    what,
                    address,
                })
        };
        let config = VringConfigData {
            queue_max_size: queue.size,
            queue_size: queue.size,
            flags: 0,
            desc_table_addr: host("descriptor", queue.desc)?,
            used_ring_addr: host("used", queue.device)?,
            avail_ring_addr: host("available", queue.driver)?,
            log_addr: None,
        };
        let i = usize::from(index);
        self.acked("SET_VRING_NUM", |f| f.set_vring_num(i, queue.size))?;
        self.acked("SET_VRING_BASE", |f| f.set_vring_base(i, base))?;
        self.acked("SET_VRING_ADDR", |f| f.set_vring_addr(i, &config))?;
        self.acked("SET_VRING_KICK", |f| f.set_vring_kick(i, kick))?;
        self.acked("SET_VRING_CALL", |f| f.set_vring_call(i, call))?;
        Ok(())
    }

    /// SET_VRING_ENABLE.
    pub fn enable_vring(&mut self, index: u16, enable: bool) -> Result<(), VhostUserError> {
        self.acked("SET_VRING_ENABLE", |f| {
            f.set_vring_enable(usize::from(index), enable)
        })
    }

    /// GET_VRING_BASE: stops the ring; returns where the backend would go on.
    pub fn get_vring_base(&mut self, index: u16) -> Result<u32, VhostUserError> {
        self.frontend
            .get_vring_base(usize::from(index))
            .map_err(self.message("GET_VRING_BASE"))
    }

    /// Shuts the socket down both ways: a message that failed half-way leaves the stream out of
    /// step, and the hang-up watcher wakes on our own shutdown and reconnects.
    pub fn shut_down(&self) {
        // Already shut down or gone is what this wants anyway.
        let _ = self.watch.shutdown(Shutdown::Both);
    }

    /// Another handle on the socket, for watching it for hang-ups.
    pub fn watch_socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.watch.try_clone().map(std::os::fd::OwnedFd::from)
    }
}
