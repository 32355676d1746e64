//! Benchmarks (not tests): they run real guests in a lane, side by side with QEMU, and print a
//! table. `scripts/bench SUBCOMMAND` sets up the images and static binaries and runs one.
//!
//! - [`boot`] — time from starting the VMM to the guest's init, and the VMM's memory overhead.
//! - [`stack`] — the same guest's disk I/O through the whole stack under splitvmm and QEMU.
//! - [`probe`] — the measuring half that runs in the lane's host next to each VMM (it is the
//!   same binary, built statically, in `probe` mode).
//! - [`stats`] — medians and the table helpers the benchmarks share.

pub mod blk;
pub mod boot;
pub mod probe;
pub mod stack;
pub mod stats;

use crate::lane::LaneError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad command line; the text includes the usage.
    #[error("{0}")]
    Usage(String),
    /// `--help`: the usage, asked for.
    #[error("{0}")]
    Help(String),
    /// Something the benchmark needs is not there.
    #[error("{0}")]
    Setup(String),
    /// The lane could not run (timeout, L1 trouble, missing images).
    #[error(transparent)]
    Lane(#[from] LaneError),
    /// At least one VMM run failed; the message lists which and why.
    #[error("{0}")]
    RunsFailed(String),
}
