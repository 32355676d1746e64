//! splitvmm-blk: a vhost-user-blk backend daemon.
//!
//! `run` listens on a unix socket and serves one disk image to one vhost-user frontend at a
//! time, accepting the next frontend when one goes away. Module map:
//!
//! - `config`: the command line, validated
//! - `daemon`: the accept loop, per-connection sessions, SIGTERM/SIGINT
//! - `backend`: the vhost-user glue (features, config space, queue events)
//! - `config_space`: `struct virtio_blk_config`
//! - `worker`: one queue's request loop
//! - `request`: parsing and validating a request (all guest input)
//! - `io`: doing the I/O (`io::sync`: preadv/pwritev)
//! - `disk`: the image file or block device

pub mod backend;
pub mod config;
pub mod config_space;
pub mod daemon;
pub mod disk;
pub mod inflight;
pub mod io;
pub mod request;
pub mod worker;

pub use daemon::{run, RunError};

/// Guest memory as the backend maps it (no dirty-page log: LOG_SHMFD is not offered).
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;

/// Exit status for a bad command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the backend cannot run.
pub const EXIT_RUN_ERROR: i32 = 1;
