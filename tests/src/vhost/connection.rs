//! The vhost-user control channel, frontend side, device-agnostic: connect, negotiate, hand over
//! memory and vrings — in QEMU's order (SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
//! GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, GET_CONFIG, then SET_FEATURES, SET_MEM_TABLE, per queue
//! SET_VRING_NUM/BASE/ADDR/KICK/CALL, then SET_VRING_ENABLE).
//!
//! Built on the `vhost` crate's [`Frontend`]. Every message has a deadline: the socket carries
//! SO_RCVTIMEO/SO_SNDTIMEO, so a backend that stops answering fails the call instead of hanging
//! the test. With REPLY_ACK negotiated, every message that has no reply of its own asks for an
//! ack (NEED_REPLY), so a backend's refusal surfaces at the message that caused it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};

use super::memory::{FrontendMemory, MemoryError};
use super::vring::SplitQueue;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot connect to the vhost-user socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set the timeouts of the vhost-user socket: {0}")]
    SocketTimeout(std::io::Error),
    #[error("vhost-user {what} failed: {source}")]
    Message {
        what: &'static str,
        source: vhost::Error,
    },
    #[error("the backend offers no VHOST_USER_F_PROTOCOL_FEATURES, which {0} needs")]
    NoProtocolFeatures(&'static str),
    #[error("the backend lacks protocol feature {0:?}, which is required")]
    MissingProtocolFeature(VhostUserProtocolFeatures),
    #[error("{wanted} queues asked for, the backend has {backend}")]
    TooFewQueues { wanted: u16, backend: u64 },
    #[error("the backend answered {what} with {got} bytes, {want} asked for")]
    ShortReply {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("vring address translation: {0}")]
    Memory(#[from] MemoryError),
}

fn msg(what: &'static str) -> impl FnOnce(vhost::Error) -> ConnectionError {
    move |source| ConnectionError::Message { what, source }
}

/// How SET_MEM_TABLE's job is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryMessage {
    /// One SET_MEM_TABLE with every region.
    #[default]
    SetMemTable,
    /// ADD_MEM_REG per region (needs CONFIGURE_MEM_SLOTS).
    AddMemReg,
}

#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    pub num_queues: u16,
    /// Virtio feature bits the driver would ack; the backend's offer masks them.
    /// VHOST_USER_F_PROTOCOL_FEATURES is added whenever the backend offers it.
    pub virtio_features: u64,
    /// Protocol features the frontend would ack; the backend's offer masks them.
    pub protocol_features: VhostUserProtocolFeatures,
    pub memory_message: MemoryMessage,
    /// Deadline for each control message (send and reply).
    pub message_timeout: Duration,
}

impl Default for HandshakeOptions {
    fn default() -> Self {
        HandshakeOptions {
            num_queues: 1,
            virtio_features: 0,
            protocol_features: VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            memory_message: MemoryMessage::SetMemTable,
            message_timeout: Duration::from_secs(5),
        }
    }
}

/// What the backend offered and what was acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub offered_features: u64,
    pub acked_features: u64,
    /// `None` when the backend does not offer VHOST_USER_F_PROTOCOL_FEATURES.
    pub offered_protocol: Option<VhostUserProtocolFeatures>,
    pub acked_protocol: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM's answer (with MQ).
    pub backend_queues: Option<u64>,
    /// GET_MAX_MEM_SLOTS's answer (with CONFIGURE_MEM_SLOTS).
    pub max_mem_slots: Option<u64>,
}

impl Negotiated {
    pub fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    pub fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol.contains(f)
    }
}

/// Connects to `path`, retrying while the backend has not created or is not yet listening on
/// the socket, until `deadline`.
pub fn connect_socket(path: &Path, deadline: Instant) -> Result<UnixStream, ConnectionError> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(ConnectionError::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

pub struct VhostUserConnection {
    frontend: Frontend,
    negotiated: Negotiated,
    num_queues: u16,
    memory_message: MemoryMessage,
}

impl VhostUserConnection {
    /// Connects and negotiates: SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES,
    /// SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS. SET_FEATURES comes later
    /// ([`Self::set_features`]), after the device has read its config.
    pub fn open(
        path: &Path,
        opts: &HandshakeOptions,
        deadline: Instant,
    ) -> Result<Self, ConnectionError> {
        let sock = connect_socket(path, deadline)?;
        Self::handshake(sock, opts)
    }

    /// Like [`Self::open`] on an already connected stream.
    pub fn handshake(sock: UnixStream, opts: &HandshakeOptions) -> Result<Self, ConnectionError> {
        sock.set_read_timeout(Some(opts.message_timeout))
            .and_then(|()| sock.set_write_timeout(Some(opts.message_timeout)))
            .map_err(ConnectionError::SocketTimeout)?;
        let mut frontend = Frontend::from_stream(sock, u64::from(opts.num_queues.max(1)));
        frontend.set_owner().map_err(msg("SET_OWNER"))?;
        let offered_features = frontend.get_features().map_err(msg("GET_FEATURES"))?;
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut acked_features = offered_features & opts.virtio_features;
        let mut offered_protocol = None;
        let mut acked_protocol = VhostUserProtocolFeatures::empty();
        if offered_features & proto_bit != 0 {
            acked_features |= proto_bit;
            let offer = frontend
                .get_protocol_features()
                .map_err(msg("GET_PROTOCOL_FEATURES"))?;
            offered_protocol = Some(offer);
            acked_protocol = offer & opts.protocol_features;
            frontend
                .set_protocol_features(acked_protocol)
                .map_err(msg("SET_PROTOCOL_FEATURES"))?;
        }
        let mut conn = VhostUserConnection {
            frontend,
            negotiated: Negotiated {
                offered_features,
                acked_features,
                offered_protocol,
                acked_protocol,
                backend_queues: None,
                max_mem_slots: None,
            },
            num_queues: opts.num_queues.max(1),
            memory_message: opts.memory_message,
        };
        if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = conn
                .frontend
                .get_queue_num()
                .map_err(msg("GET_QUEUE_NUM"))?;
            conn.negotiated.backend_queues = Some(n);
            if n < u64::from(conn.num_queues) {
                return Err(ConnectionError::TooFewQueues {
                    wanted: conn.num_queues,
                    backend: n,
                });
            }
        } else if conn.num_queues > 1 {
            return Err(ConnectionError::MissingProtocolFeature(
                VhostUserProtocolFeatures::MQ,
            ));
        }
        if acked_protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let n = conn
                .frontend
                .get_max_mem_slots()
                .map_err(msg("GET_MAX_MEM_SLOTS"))?;
            conn.negotiated.max_mem_slots = Some(n);
        } else if opts.memory_message == MemoryMessage::AddMemReg {
            return Err(ConnectionError::MissingProtocolFeature(
                VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            ));
        }
        Ok(conn)
    }

    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The `vhost` crate's frontend, for protocol tests that send messages of their own.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Runs `f` with NEED_REPLY set when REPLY_ACK was negotiated (only for messages without
    /// a reply of their own).
    fn acked<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, ConnectionError> {
        let ack = self
            .negotiated
            .has_protocol(VhostUserProtocolFeatures::REPLY_ACK);
        if ack {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let r = f(&mut self.frontend);
        if ack {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        r.map_err(msg(what))
    }

    /// GET_CONFIG of `size` bytes from offset 0 of the device config space.
    pub fn get_config(&mut self, size: u32) -> Result<Vec<u8>, ConnectionError> {
        if !self
            .negotiated
            .has_protocol(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(ConnectionError::MissingProtocolFeature(
                VhostUserProtocolFeatures::CONFIG,
            ));
        }
        let zeros = vec![0u8; size as usize];
        let (_, payload) = self
            .frontend
            .get_config(0, size, VhostUserConfigFlags::empty(), &zeros)
            .map_err(msg("GET_CONFIG"))?;
        if payload.len() != zeros.len() {
            return Err(ConnectionError::ShortReply {
                what: "GET_CONFIG",
                got: payload.len(),
                want: zeros.len(),
            });
        }
        Ok(payload)
    }

    /// SET_FEATURES with the negotiated set.
    pub fn set_features(&mut self) -> Result<(), ConnectionError> {
        let features = self.negotiated.acked_features;
        self.acked("SET_FEATURES", |f| f.set_features(features))
    }

    /// SET_MEM_TABLE (or ADD_MEM_REG) with the frontend memory's one region.
    pub fn set_memory(&mut self, mem: &FrontendMemory) -> Result<(), ConnectionError> {
        let region = mem.region_info();
        match self.memory_message {
            MemoryMessage::SetMemTable => {
                self.acked("SET_MEM_TABLE", |f| f.set_mem_table(&[region]).map(|_| ()))
            }
            MemoryMessage::AddMemReg => {
                self.acked("ADD_MEM_REG", |f| f.add_mem_region(&region).map(|_| ()))
            }
        }
    }

    /// SET_VRING_NUM, SET_VRING_BASE (`base`), SET_VRING_ADDR (user addresses),
    /// SET_VRING_KICK, SET_VRING_CALL for one queue.
    pub fn setup_vring(&mut self, q: &SplitQueue, base: u16) -> Result<(), ConnectionError> {
        let index = usize::from(q.index());
        let l = q.layout();
        let mem = q.memory();
        let config = VringConfigData {
            queue_max_size: l.size,
            queue_size: l.size,
            flags: 0,
            desc_table_addr: mem.user_addr(l.desc)?,
            used_ring_addr: mem.user_addr(l.used)?,
            avail_ring_addr: mem.user_addr(l.avail)?,
            log_addr: None,
        };
        self.acked("SET_VRING_NUM", |f| f.set_vring_num(index, l.size))?;
        self.acked("SET_VRING_BASE", |f| f.set_vring_base(index, base))?;
        self.acked("SET_VRING_ADDR", |f| f.set_vring_addr(index, &config))?;
        self.acked("SET_VRING_KICK", |f| f.set_vring_kick(index, q.kick_fd()))?;
        self.acked("SET_VRING_CALL", |f| f.set_vring_call(index, q.call_fd()))?;
        Ok(())
    }

    /// SET_VRING_ENABLE, when VHOST_USER_F_PROTOCOL_FEATURES was negotiated (without it the
    /// backend starts a ring at SET_VRING_KICK and this does nothing).
    pub fn enable_vring(&mut self, index: u16, enable: bool) -> Result<(), ConnectionError> {
        if self.negotiated.offered_protocol.is_none() {
            return Ok(());
        }
        self.acked("SET_VRING_ENABLE", |f| {
            f.set_vring_enable(usize::from(index), enable)
        })
    }

    /// GET_INFLIGHT_FD: asks the backend for an in-flight buffer for `num_queues` queues of
    /// `queue_size` descriptors; returns its geometry (mmap_size/offset) and fd.
    pub fn get_inflight_fd(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(VhostUserInflight, File), ConnectionError> {
        if !self
            .negotiated
            .has_protocol(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Err(ConnectionError::MissingProtocolFeature(
                VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            ));
        }
        let request = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        self.frontend
            .get_inflight_fd(&request)
            .map_err(msg("GET_INFLIGHT_FD"))
    }

    /// SET_INFLIGHT_FD: hands the backend the in-flight buffer (the one from the first
    /// GET_INFLIGHT_FD, kept across reconnects).
    pub fn set_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
        file: &File,
    ) -> Result<(), ConnectionError> {
        let fd = file.as_raw_fd();
        self.acked("SET_INFLIGHT_FD", |f| f.set_inflight_fd(inflight, fd))
    }

    /// GET_VRING_BASE: stops the ring and returns the backend's next avail index.
    pub fn get_vring_base(&mut self, index: u16) -> Result<u32, ConnectionError> {
        self.frontend
            .get_vring_base(usize::from(index))
            .map_err(msg("GET_VRING_BASE"))
    }
}
