//! A guest-less vhost-user-blk frontend: memory, queues and the control connection together.
//!
//! ```no_run
//! use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, BlkStatus};
//! let mut dev = BlkFrontend::connect("/tmp/blk.sock", BlkOptions::default()).unwrap();
//! let bytes = dev.config().capacity_bytes();
//! let q = dev.queue(0);
//! assert_eq!(q.write(0, &[0x5a; 4096]).unwrap(), BlkStatus::Ok);
//! let (status, data) = q.read(0, 4096).unwrap();
//! # let _ = (bytes, status, data);
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::vhost::connection::{
    ConnectionError, HandshakeOptions, MemoryMessage, Negotiated, VhostUserConnection,
};
use crate::vhost::memory::{FrontendMemory, MemoryError, DEFAULT_MEMORY_SIZE};

use super::queue::{BlkQueue, QueueError, QueueOptions};
use super::request::{BlkConfig, RequestError, CONFIG_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("frontend memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("vhost-user-blk handshake with {socket}: {source}")]
    Handshake {
        socket: PathBuf,
        source: ConnectionError,
    },
    #[error("vhost-user-blk config from {socket}: {source}")]
    Config {
        socket: PathBuf,
        source: RequestError,
    },
    #[error("setting up queue: {0}")]
    Queue(#[from] QueueError),
    #[error("the backend at {socket} no longer offers features {lost:#x} negotiated before the reconnect")]
    FeaturesLost { socket: PathBuf, lost: u64 },
    #[error("no connection to {0} (disconnected)")]
    NotConnected(PathBuf),
}

/// Every virtio-blk feature this frontend can drive (no indirect descriptors, no packed ring).
pub fn supported_features() -> u64 {
    [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_GEOMETRY,
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1,
    ]
    .iter()
    .fold(0, |acc, bit| acc | (1u64 << bit))
}

#[derive(Debug, Clone)]
pub struct BlkOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    /// Size of the frontend memory made for this device (ignored by
    /// [`BlkFrontend::connect_with_memory`]).
    pub memory_size: u64,
    /// Virtio features the driver would ack (the backend's offer masks them).
    pub features: u64,
    pub handshake: HandshakeOptions,
    /// How long to keep retrying the connect while the backend is not listening yet.
    pub connect_timeout: Duration,
    pub queue: QueueOptions,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            num_queues: 1,
            queue_size: 256,
            memory_size: DEFAULT_MEMORY_SIZE,
            features: supported_features(),
            handshake: HandshakeOptions::default(),
            connect_timeout: Duration::from_secs(10),
            queue: QueueOptions::default(),
        }
    }
}

impl BlkOptions {
    pub fn with_queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    pub fn without_feature(mut self, bit: u32) -> Self {
        self.features &= !(1u64 << bit);
        self
    }

    /// Also acks INFLIGHT_SHMFD (when offered): the device gets an in-flight buffer from the
    /// backend at the first connect and hands the same one to every reconnect.
    pub fn with_inflight(mut self) -> Self {
        self.handshake.protocol_features |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        self
    }

    pub fn with_memory_message(mut self, m: MemoryMessage) -> Self {
        self.handshake.memory_message = m;
        self
    }
}

pub struct BlkFrontend {
    socket: PathBuf,
    opts: BlkOptions,
    mem: Arc<FrontendMemory>,
    conn: Option<VhostUserConnection>,
    config: BlkConfig,
    queues: Vec<BlkQueue>,
    /// The in-flight buffer (INFLIGHT_SHMFD), kept across reconnects as the spec asks.
    inflight: Option<(VhostUserInflight, File)>,
}

impl std::fmt::Debug for BlkFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkFrontend")
            .field("socket", &self.socket)
            .field("config", &self.config)
            .field("queues", &self.queues)
            .finish()
    }
}

impl BlkFrontend {
    /// Connects to the backend at `socket`, negotiates, and starts `opts.num_queues` queues
    /// in fresh memory of `opts.memory_size` bytes.
    pub fn connect(socket: impl AsRef<Path>, opts: BlkOptions) -> Result<Self, DeviceError> {
        let mem = FrontendMemory::new(opts.memory_size)?;
        Self::connect_with_memory(socket, opts, mem)
    }

    /// Like [`Self::connect`] in memory the caller made (e.g. at another guest base).
    pub fn connect_with_memory(
        socket: impl AsRef<Path>,
        opts: BlkOptions,
        mem: Arc<FrontendMemory>,
    ) -> Result<Self, DeviceError> {
        let socket = socket.as_ref().to_owned();
        let conn = open(&socket, &opts)?;
        Self::start_on(socket, conn, opts, mem)
    }

    /// Like [`Self::connect`] over a stream already connected to the backend (e.g. one end of a
    /// socketpair whose other end the backend got with `--fd`); `name` stands for the socket
    /// path in errors, and reconnecting is not possible.
    pub fn over_stream(
        stream: std::os::unix::net::UnixStream,
        name: &str,
        opts: BlkOptions,
    ) -> Result<Self, DeviceError> {
        let socket = std::path::PathBuf::from(name);
        let hs = HandshakeOptions {
            num_queues: opts.num_queues,
            virtio_features: opts.features,
            ..opts.handshake.clone()
        };
        let conn = VhostUserConnection::handshake(stream, &hs).map_err(|source| {
            DeviceError::Handshake {
                socket: socket.clone(),
                source,
            }
        })?;
        let mem = FrontendMemory::new(opts.memory_size)?;
        Self::start_on(socket, conn, opts, mem)
    }

    fn start_on(
        socket: std::path::PathBuf,
        mut conn: VhostUserConnection,
        opts: BlkOptions,
        mem: Arc<FrontendMemory>,
    ) -> Result<Self, DeviceError> {
        let config = read_config(&socket, &mut conn)?;
        let mut queues = Vec::with_capacity(usize::from(opts.num_queues));
        let event_idx = conn.negotiated().has_feature(VIRTIO_RING_F_EVENT_IDX);
        for i in 0..opts.num_queues {
            let mut q = BlkQueue::new(&mem, i, opts.queue_size, opts.queue)?;
            q.vring_mut().set_event_idx(event_idx);
            queues.push(q);
        }
        let mut dev = BlkFrontend {
            socket,
            opts,
            mem,
            conn: None,
            config,
            queues,
            inflight: None,
        };
        dev.start(conn, false)?;
        Ok(dev)
    }

    /// SET_FEATURES, SET_MEM_TABLE, the vrings (base = the used index in memory), then
    /// SET_VRING_ENABLE; with `kick`, one kick per queue so anything made available while
    /// disconnected is seen.
    fn start(&mut self, mut conn: VhostUserConnection, kick: bool) -> Result<(), DeviceError> {
        let hs = |source| DeviceError::Handshake {
            socket: self.socket.clone(),
            source,
        };
        conn.set_features().map_err(hs)?;
        if conn
            .negotiated()
            .has_protocol(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if self.inflight.is_none() {
                let got = conn
                    .get_inflight_fd(self.opts.num_queues, self.opts.queue_size)
                    .map_err(hs)?;
                self.inflight = Some(got);
            }
            if let Some((info, file)) = &self.inflight {
                conn.set_inflight_fd(info, file).map_err(hs)?;
            }
        }
        conn.set_memory(&self.mem).map_err(hs)?;
        for q in &self.queues {
            let base = q.vring().used_idx().map_err(QueueError::from)?;
            conn.setup_vring(q.vring(), base).map_err(hs)?;
        }
        for q in &self.queues {
            conn.enable_vring(q.index(), true).map_err(hs)?;
        }
        self.conn = Some(conn);
        if kick {
            for q in &mut self.queues {
                q.vring_mut().kick().map_err(QueueError::from)?;
            }
        }
        Ok(())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_bytes()
    }

    pub fn memory(&self) -> &Arc<FrontendMemory> {
        &self.mem
    }

    pub fn options(&self) -> &BlkOptions {
        &self.opts
    }

    /// What was negotiated on the current connection.
    pub fn negotiated(&self) -> Result<&Negotiated, DeviceError> {
        self.conn
            .as_ref()
            .map(VhostUserConnection::negotiated)
            .ok_or_else(|| DeviceError::NotConnected(self.socket.clone()))
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.negotiated().is_ok_and(|n| n.has_feature(bit))
    }

    /// The control connection, for protocol tests that send their own messages.
    pub fn connection(&mut self) -> Result<&mut VhostUserConnection, DeviceError> {
        self.conn
            .as_mut()
            .ok_or_else(|| DeviceError::NotConnected(self.socket.clone()))
    }

    /// Queue `i` (panics when there is no such queue: a caller's programming error).
    pub fn queue(&mut self, i: usize) -> &mut BlkQueue {
        &mut self.queues[i]
    }

    /// All queues, e.g. to drive each from its own thread with `std::thread::scope`.
    pub fn queues_mut(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }

    /// GET_VRING_BASE on every queue (the backend stops them) and returns its answers.
    pub fn stop(&mut self) -> Result<Vec<u32>, DeviceError> {
        let socket = self.socket.clone();
        let conn = self.connection()?;
        let n = conn.num_queues();
        (0..n)
            .map(|i| {
                conn.get_vring_base(i)
                    .map_err(|source| DeviceError::Handshake {
                        socket: socket.clone(),
                        source,
                    })
            })
            .collect()
    }

    /// Closes the control socket (the backend sees the hang-up); memory, rings, eventfds and
    /// anything in flight stay, as they would for a guest.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// The in-flight buffer's geometry, when INFLIGHT_SHMFD was negotiated.
    pub fn inflight(&self) -> Option<&VhostUserInflight> {
        self.inflight.as_ref().map(|(info, _)| info)
    }

    /// The in-flight buffer's file (e.g. for a test to inspect what a killed backend left).
    pub fn inflight_file(&self) -> Option<&File> {
        self.inflight.as_ref().map(|(_, file)| file)
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Closes the current connection (if any), connects again and hands the same memory,
    /// rings and eventfds to the backend, resuming each ring at the used index in memory
    /// (what QEMU does for a restarted backend without in-flight tracking; exact when the
    /// backend completes in order or nothing was in flight). The features must match the
    /// first negotiation. Kicks every queue once.
    pub fn reconnect(&mut self) -> Result<(), DeviceError> {
        let before = self.conn.take().map(|c| c.negotiated().acked_features);
        for q in &self.queues {
            q.vring().clear_call();
        }
        // Ack exactly what was acked before: the ring format must not change under the driver.
        let mut opts = self.opts.clone();
        if let Some(acked) = before {
            opts.features = acked;
        }
        let mut conn = open(&self.socket, &opts)?;
        if let Some(acked) = before {
            let lost = acked & !conn.negotiated().acked_features;
            if lost != 0 {
                return Err(DeviceError::FeaturesLost {
                    socket: self.socket.clone(),
                    lost,
                });
            }
        }
        self.config = read_config(&self.socket, &mut conn)?;
        self.start(conn, true)
    }
}

fn open(socket: &Path, opts: &BlkOptions) -> Result<VhostUserConnection, DeviceError> {
    let hs = HandshakeOptions {
        num_queues: opts.num_queues,
        virtio_features: opts.features,
        ..opts.handshake.clone()
    };
    let deadline = Instant::now() + opts.connect_timeout;
    VhostUserConnection::open(socket, &hs, deadline).map_err(|source| DeviceError::Handshake {
        socket: socket.to_owned(),
        source,
    })
}

fn read_config(socket: &Path, conn: &mut VhostUserConnection) -> Result<BlkConfig, DeviceError> {
    let raw = conn
        .get_config(CONFIG_SIZE)
        .map_err(|source| DeviceError::Handshake {
            socket: socket.to_owned(),
            source,
        })?;
    BlkConfig::parse(&raw).map_err(|source| DeviceError::Config {
        socket: socket.to_owned(),
        source,
    })
}
