//! Doing the I/O of validated requests against the image.
//!
//! `sync` is the preadv/pwritev engine: each worker thread blocks in the syscall, one request at
//! a time. TODO(issue 3): an io_uring engine (io-uring crate) with this one as the fallback where
//! io_uring is unavailable, the default picked by benchmark.

use std::io;

use thiserror::Error;

pub mod sync;

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
