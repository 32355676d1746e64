//! A guest-less vhost-user frontend: what a VMM does for a vhost-user device, minus the guest.
//! Protocol tests of the backends and the `splitvmm-bench blk` load generator drive backends
//! through it over a real socket, with memfd memory and hand-built split vrings.
//!
//! - [`memory`] — the memfd "guest" memory (MAP_SHARED, at a non-zero guest-physical base)
//!   and its allocator ([`alloc`]).
//! - [`vring`] — split virtqueues: descriptor table, avail/used rings, EVENT_IDX, eventfds;
//!   their memory format in [`ring_format`].
//! - [`connection`] — the vhost-user handshake on the `vhost` crate's `Frontend`.
//! - [`blk`] — virtio-blk requests, queues, the device, malformed chains, the load generator.
//! - [`process`], [`qsd`] — backend processes a test owns; qemu-storage-daemon as the
//!   reference backend.
//!
//! ```no_run
//! use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, BlkRequest, BlkStatus};
//! use splitvmm_tests::vhost::qsd::{Qsd, QsdOptions};
//!
//! let qsd = Qsd::with_new_image(64 << 20, &QsdOptions::default()).unwrap();
//! let mut dev = BlkFrontend::connect(qsd.socket(), BlkOptions::default()).unwrap();
//! assert_eq!(dev.config().capacity_bytes(), 64 << 20);
//! let mem = dev.memory().clone();
//! let q = dev.queue(0);
//! assert_eq!(q.write(8, &[0x5a; 4096]).unwrap(), BlkStatus::Ok);
//! let (status, data) = q.read(8, 4096).unwrap();
//! assert_eq!((status, data), (BlkStatus::Ok, vec![0x5a; 4096]));
//! // Batches: enqueue many, commit once, wait for them.
//! let bufs: Vec<_> = (0..32).map(|_| mem.alloc_owned(4096, 4096).unwrap()).collect();
//! for (i, b) in bufs.iter().enumerate() {
//!     q.enqueue(&BlkRequest::read(i as u64 * 8, &[b.buf()]).with_tag(i as u64)).unwrap();
//! }
//! q.commit().unwrap();
//! let mut done = Vec::new();
//! q.wait(32, &mut done).unwrap();
//! assert!(done.iter().all(|c| c.status == BlkStatus::Ok));
//! ```

pub mod alloc;
pub mod blk;
pub mod blk_daemon;
pub mod connection;
pub mod memory;
pub mod net;
pub mod process;
pub mod qsd;
pub mod ring_format;
pub mod vring;
