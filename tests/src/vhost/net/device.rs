//! A guest-less vhost-user-net frontend: memory, queue pairs and the control connection.
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use splitvmm_tests::vhost::net::{NetFrontend, NetHeader, NetOptions};
//! let mut dev = NetFrontend::connect("/tmp/net.sock", NetOptions::default()).unwrap();
//! let pair = dev.pair(0);
//! pair.rx.post(64, 2048).unwrap();
//! pair.tx.send(&NetHeader::plain(), &[0u8; 60]).unwrap();
//! pair.tx.wait_all(Instant::now() + Duration::from_secs(5)).unwrap();
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::vhost::connection::{
    ConnectionError, HandshakeOptions, Negotiated, VhostUserConnection,
};
use crate::vhost::memory::{FrontendMemory, MemoryError, DEFAULT_MEMORY_SIZE};

use super::header::{NetConfig, CONFIG_SIZE};
use super::queue::{NetQueueError, RxQueue, TxQueue};

#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    #[error("frontend memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("vhost-user-net handshake with {socket}: {source}")]
    Handshake {
        socket: PathBuf,
        source: ConnectionError,
    },
    #[error("vhost-user-net config from {0} is malformed")]
    Config(PathBuf),
    #[error("setting up a queue: {0}")]
    Queue(#[from] NetQueueError),
}

/// Every feature this frontend can drive (no control queue, no indirect descriptors).
pub fn supported_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_MQ,
        VIRTIO_RING_F_EVENT_IDX,
    ]
    .iter()
    .fold(0, |acc, bit| acc | (1u64 << bit))
}

#[derive(Debug, Clone)]
pub struct NetOptions {
    pub num_pairs: u16,
    pub queue_size: u16,
    pub memory_size: u64,
    /// Virtio features the driver would ack (the backend's offer masks them).
    pub features: u64,
    pub handshake: HandshakeOptions,
    pub connect_timeout: Duration,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            num_pairs: 1,
            queue_size: 256,
            memory_size: DEFAULT_MEMORY_SIZE,
            features: supported_features(),
            handshake: HandshakeOptions::default(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl NetOptions {
    pub fn without_feature(mut self, bit: u32) -> Self {
        self.features &= !(1u64 << bit);
        self
    }

    pub fn with_pairs(mut self, n: u16) -> Self {
        self.num_pairs = n;
        self
    }
}

#[derive(Debug)]
pub struct NetPair {
    pub rx: RxQueue,
    pub tx: TxQueue,
}

pub struct NetFrontend {
    socket: PathBuf,
    mem: Arc<FrontendMemory>,
    conn: VhostUserConnection,
    config: NetConfig,
    pairs: Vec<NetPair>,
}

impl std::fmt::Debug for NetFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetFrontend")
            .field("socket", &self.socket)
            .field("config", &self.config)
            .field("pairs", &self.pairs)
            .finish()
    }
}

impl NetFrontend {
    /// Connects, negotiates, and starts `opts.num_pairs` queue pairs (RX 2i, TX 2i+1) with
    /// no receive buffers posted yet.
    pub fn connect(socket: impl AsRef<Path>, opts: NetOptions) -> Result<Self, NetDeviceError> {
        let socket = socket.as_ref().to_owned();
        let mem = FrontendMemory::new(opts.memory_size)?;
        let hs_err = |source| NetDeviceError::Handshake {
            socket: socket.clone(),
            source,
        };
        let hs = HandshakeOptions {
            num_queues: 2 * opts.num_pairs,
            virtio_features: opts.features,
            ..opts.handshake.clone()
        };
        let deadline = Instant::now() + opts.connect_timeout;
        let mut conn = VhostUserConnection::open(&socket, &hs, deadline).map_err(hs_err)?;
        // Without the CONFIG protocol feature (DPDK's vhost PMD) the config space is the
        // frontend's own business, as in QEMU: a zeroed one with the link up.
        let config = if conn
            .negotiated()
            .has_protocol(VhostUserProtocolFeatures::CONFIG)
        {
            let raw = conn.get_config(CONFIG_SIZE).map_err(hs_err)?;
            NetConfig::parse(&raw).ok_or_else(|| NetDeviceError::Config(socket.clone()))?
        } else {
            NetConfig {
                mac: [0; 6],
                status: 1,
                max_virtqueue_pairs: opts.num_pairs,
                mtu: 0,
            }
        };
        let event_idx = conn.negotiated().has_feature(VIRTIO_RING_F_EVENT_IDX);
        let mut pairs = Vec::new();
        for p in 0..opts.num_pairs {
            let mut rx = RxQueue::new(&mem, 2 * p, opts.queue_size)?;
            let mut tx = TxQueue::new(&mem, 2 * p + 1, opts.queue_size)?;
            rx.vring_mut().set_event_idx(event_idx);
            tx.vring_mut().set_event_idx(event_idx);
            pairs.push(NetPair { rx, tx });
        }
        conn.set_features().map_err(hs_err)?;
        conn.set_memory(&mem).map_err(hs_err)?;
        for p in &pairs {
            conn.setup_vring(p.rx.vring(), 0).map_err(hs_err)?;
            conn.setup_vring(p.tx.vring(), 0).map_err(hs_err)?;
        }
        for p in &pairs {
            conn.enable_vring(p.rx.vring().index(), true)
                .map_err(hs_err)?;
            conn.enable_vring(p.tx.vring().index(), true)
                .map_err(hs_err)?;
        }
        Ok(NetFrontend {
            socket,
            mem,
            conn,
            config,
            pairs,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    pub fn negotiated(&self) -> &Negotiated {
        self.conn.negotiated()
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.conn.negotiated().has_feature(bit)
    }

    pub fn memory(&self) -> &Arc<FrontendMemory> {
        &self.mem
    }

    pub fn connection(&mut self) -> &mut VhostUserConnection {
        &mut self.conn
    }

    /// Pair `i` (panics when there is no such pair: a caller's programming error).
    pub fn pair(&mut self, i: usize) -> &mut NetPair {
        &mut self.pairs[i]
    }

    pub fn pairs_mut(&mut self) -> &mut [NetPair] {
        &mut self.pairs
    }
}
