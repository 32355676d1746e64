//! The virtio-blk side of the test frontend.
//!
//! - [`request`] — config space, request header, status, discard/write-zeroes ranges.
//! - [`queue`] — one request queue: submit, batch, wait, and one-call helpers
//!   (`read`, `write`, `flush`, `get_id`, `discard`, `write_zeroes`).
//! - [`device`] — [`BlkFrontend`]: connect, handshake, queues, reconnect.
//! - [`malformed`] — deliberately broken chains for fault tests.
//! - [`conformance`] — checks every vhost-user-blk backend must pass (shared by the qsd and
//!   splitvmm-blk tests).
//! - [`loadgen`] — the closed-loop load generator of `splitvmm-bench blk`.

pub mod conformance;
pub mod device;
pub mod loadgen;
pub mod malformed;
pub mod queue;
pub mod request;

pub use device::{supported_features, BlkFrontend, BlkOptions, DeviceError};
pub use queue::{BlkQueue, QueueError, QueueOptions, RequestSlot};
pub use request::{
    BlkCompletion, BlkConfig, BlkHeader, BlkRange, BlkRequest, BlkStatus, ID_BYTES, SECTOR_SIZE,
};
