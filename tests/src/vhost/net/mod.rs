//! The virtio-net side of the test frontend, and what net tests need around it.
//!
//! - [`header`] — the virtio-net header and config space.
//! - [`queue`] — an RX queue (posted buffers, frames reassembled over MRG_RXBUF buffers) and a
//!   TX queue (header + frame chains, raw chains for fault tests).
//! - [`device`] — [`NetFrontend`]: connect, handshake, queue pairs.
//! - [`packet`] — Ethernet/IPv4/UDP/ICMP/TCP frames built and parsed by hand.
//! - [`netns`] — a network namespace a test owns, with commands and sockets inside.
//! - [`daemon`] — `splitvmm-net` as a process in such a namespace.

pub mod daemon;
pub mod device;
pub mod header;
pub mod netns;
pub mod packet;
pub mod queue;

pub use device::{supported_features, NetDeviceError, NetFrontend, NetOptions, NetPair};
pub use header::{NetConfig, NetHeader, HDR_LEN};
pub use queue::{NetQueueError, RxFrame, RxQueue, TxQueue};
