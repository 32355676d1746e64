//! Doing the I/O of validated requests against the image.
//!
//! Two engines, picked with `--io-engine`:
//!
//! - `sync`: preadv/pwritev; each worker thread blocks in the syscall, one request at a time.
//! - `uring`: one io_uring per queue worker; requests are submitted without blocking and
//!   complete out of order as their CQEs arrive (see [`uring`]).
//!
//! Where io_uring is unavailable (io_uring_setup fails: ENOSYS on old kernels, EPERM under
//! `kernel.io_uring_disabled` or seccomp) the daemon falls back to `sync` with one log line.

use std::io;

use thiserror::Error;

pub mod sync;
pub mod uring;

/// The I/O engine a queue worker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// io_uring, one ring per queue.
    Uring,
    /// preadv/pwritev in the worker thread.
    Sync,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
        }
    }

    /// The engine that will actually run: `Uring` only where io_uring works here (else `Sync`,
    /// with one log line).
    pub fn usable(self) -> EngineKind {
        match self {
            EngineKind::Uring => match uring::probe() {
                Ok(()) => EngineKind::Uring,
                Err(e) => {
                    log::warn!("io_uring is unavailable ({e}); using the sync I/O engine");
                    EngineKind::Sync
                }
            },
            EngineKind::Sync => EngineKind::Sync,
        }
    }
}

#[derive(Debug, Error)]
pub enum IoError {
    #[error("{op} of {len} bytes at image offset {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("{op} of {len} bytes at image offset {offset} stopped after {done} bytes")]
    Short {
        op: &'static str,
        offset: u64,
        len: u64,
        done: u64,
    },
    #[error("guest buffer at {addr:#x} ({len} bytes) is not in guest memory")]
    GuestMemory { addr: u64, len: u32 },
    #[error("flush failed: {0}")]
    Flush(io::Error),
}
