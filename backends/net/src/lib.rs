//! splitvmm-net: a vhost-user-net backend daemon on a tap device.
//!
//! `run` opens (or creates) the tap, listens on a unix socket and serves one vhost-user
//! frontend at a time, accepting the next one when one goes away. Module map:
//!
//! - `config`: the command line, validated
//! - `daemon`: the accept loop, per-connection sessions, SIGTERM/SIGINT
//! - `backend`: the vhost-user glue (features, config space, queue events)
//! - `device`: features, protocol features, `struct virtio_net_config`, offload mapping
//! - `tap`: the tap device (create/attach, vnet header, offloads, queues, host address)
//! - `watch`: the tap watcher (tap deleted → drop TX; tap back → resume)
//! - `worker`: one queue pair's RX and TX loops
//! - `relay`: the message relay in front of the crate's handler (early SET_VRING_ENABLE)
//! - `frame`: TX chain and virtio-net header validation (all guest input)
//! - `stats`: per-pair counters and rate-limited drop logging

pub mod backend;
pub mod config;
pub mod daemon;
pub mod device;
pub mod frame;
pub mod relay;
pub mod stats;
pub mod tap;
pub mod watch;
pub mod worker;

pub use daemon::{run, RunError};

/// Guest memory as the backend maps it (no dirty-page log: LOG_SHMFD is not offered).
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;

/// Exit status for a bad command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the backend cannot run.
pub const EXIT_RUN_ERROR: i32 = 1;
