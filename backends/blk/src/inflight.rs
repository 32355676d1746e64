//! Backend-side in-flight tracking for split rings (vhost-user INFLIGHT_SHMFD), as the vhost-user
//! spec's "Inflight I/O tracking" section describes.
//!
//! The frontend keeps a shared-memory buffer across backend restarts (GET_INFLIGHT_FD makes it,
//! SET_INFLIGHT_FD hands it to every new backend). Per queue it holds a 16-byte header
//! (`features: u64, version: u16, desc_num: u16, last_batch_head: u16, used_idx: u16`) and one
//! 16-byte state per descriptor (`inflight: u8, padding: [u8; 5], next: u16, counter: u64`).
//!
//! - fetch: `counter` = a running number, then `inflight = 1`;
//! - completion: the head becomes the last batch (`last_batch_head`; our batches hold one entry,
//!   so `next` links nothing further), the used entry is published, then `inflight = 0` and
//!   `used_idx` = the ring's new used index;
//! - (re)connect: a fresh buffer (version 0) is initialised, `used_idx` included; otherwise a
//!   crash between publishing and clearing is repaired (the ring's used index differs from
//!   `used_idx`: the last batch is cleared), and what is still in flight is resubmitted in
//!   `counter` order before new requests are popped.
//!
//! The buffer belongs to the frontend: every size in the messages is checked before mapping, and
//! every index read from it is bounds-checked before use.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use nix::sys::memfd::{memfd_create, MFdFlags};

/// Version written into a freshly initialised queue region.
const VERSION: u16 = 1;
const HEADER_SIZE: u64 = 16;
const DESC_SIZE: u64 = 16;
/// Each queue region starts on this boundary (as libvhost-user lays them out).
const QUEUE_ALIGN: u64 = 64;
/// The largest split ring.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of one queue's region for queues of up to `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = HEADER_SIZE + DESC_SIZE * u64::from(queue_size);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Checks the geometry a frontend asked for against what this backend serves.
pub fn check_geometry(num_queues: u16, queue_size: u16, max_queues: u16) -> io::Result<()> {
    if num_queues == 0 || num_queues > max_queues {
        return Err(invalid(format!(
            "in-flight buffer for {num_queues} queues (this device has {max_queues})"
        )));
    }
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(invalid(format!(
            "in-flight buffer for queues of {queue_size} descriptors"
        )));
    }
    Ok(())
}

/// A mapped in-flight buffer.
pub struct InflightMap {
    map: *mut libc::c_void,
    map_len: usize,
    /// Where the first queue region starts (inside the mapping).
    base: *mut u8,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory, accessed only through atomics.
unsafe impl Send for InflightMap {}
// SAFETY: as above.
unsafe impl Sync for InflightMap {}

impl std::fmt::Debug for InflightMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightMap")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightMap {
    /// GET_INFLIGHT_FD: a zeroed, sealed memfd for `num_queues` queues of up to `queue_size`;
    /// returns the mapping, the fd for the frontend and its size.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(Self, File, u64)> {
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        let fd = memfd_create(
            "splitvmm-blk-inflight",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(size)?;
        // The frontend cannot shrink it under our mapping (which would SIGBUS us).
        // SAFETY: fcntl on an owned descriptor, no pointers.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let map = Self::map(&file, size, 0, num_queues, queue_size)?;
        Ok((map, file, size))
    }

    /// SET_INFLIGHT_FD: maps `file` after checking the frontend's sizes against it.
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let needed = queue_region_size(queue_size) * u64::from(num_queues);
        if mmap_size < needed {
            return Err(invalid(format!(
                "in-flight buffer of {mmap_size} bytes, {needed} needed"
            )));
        }
        if !mmap_offset.is_multiple_of(8) {
            return Err(invalid(format!(
                "in-flight buffer offset {mmap_offset} is not 8-byte aligned"
            )));
        }
        let end = mmap_offset
            .checked_add(needed)
            .ok_or_else(|| invalid("in-flight buffer offset overflows".into()))?;
        let file_len = file.metadata()?.len();
        if end > file_len {
            return Err(invalid(format!(
                "in-flight buffer ends at {end}, past its file's {file_len} bytes"
            )));
        }
        // A frontend that could shrink the file under the mapping could make this backend's
        // next access to it fault (SIGBUS) and take the daemon down. The buffer a frontend
        // hands back is the one GET_INFLIGHT_FD made (sealed here, and by QEMU's backends
        // too), so a buffer without the seal is refused rather than trusted.
        // SAFETY: fcntl on a descriptor we hold, no pointers.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid(
                "in-flight buffer is not sealed against shrinking (F_SEAL_SHRINK)".into(),
            ));
        }
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let start = mmap_offset / page * page;
        let delta = mmap_offset - start;
        let map_len = usize::try_from(end - start)
            .map_err(|_| invalid("in-flight buffer too large".into()))?;
        let off = libc::off_t::try_from(start)
            .map_err(|_| invalid("in-flight buffer offset too large".into()))?;
        // SAFETY: a new shared mapping of a file we hold; its length was checked against the
        // file's size above. Unmapped in Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: delta < page <= map_len, so the pointer stays inside the mapping.
        let base = unsafe { map.cast::<u8>().add(delta as usize) };
        Ok(InflightMap {
            map,
            map_len,
            base,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The view of queue `index`, if the buffer covers it.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        let offset = queue_region_size(self.queue_size) * u64::from(index);
        // SAFETY: index < num_queues, and the mapping holds num_queues regions.
        let region = unsafe { self.base.add(offset as usize) };
        Some(InflightQueue {
            _map: self.clone(),
            region,
            desc_num: self.queue_size,
            counter: 0,
        })
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no InflightQueue outlives it (each
        // holds an Arc to it).
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// One queue's region of the in-flight buffer.
pub struct InflightQueue {
    _map: Arc<InflightMap>,
    region: *mut u8,
    /// Descriptor states the region holds.
    desc_num: u16,
    /// The next fetch number.
    counter: u64,
}

// SAFETY: shared memory accessed through atomics; the Arc keeps it mapped.
unsafe impl Send for InflightQueue {}

impl std::fmt::Debug for InflightQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightQueue")
            .field("desc_num", &self.desc_num)
            .field("counter", &self.counter)
            .finish()
    }
}

/// What recovery found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads still in flight, oldest fetch first.
    pub resubmit: Vec<u16>,
    /// Whether the buffer was fresh (and has now been initialised).
    pub fresh: bool,
    /// Entries of a published last batch that were cleared.
    pub repaired: usize,
}

impl InflightQueue {
    fn u8_at(&self, offset: u64) -> &AtomicU8 {
        // SAFETY: callers pass offsets inside the region (header or a checked descriptor).
        unsafe { &*self.region.add(offset as usize).cast::<AtomicU8>() }
    }
    fn u16_at(&self, offset: u64) -> &AtomicU16 {
        // SAFETY: as above; every u16 field sits on an even offset of an 8-aligned region.
        unsafe { &*self.region.add(offset as usize).cast::<AtomicU16>() }
    }
    fn u64_at(&self, offset: u64) -> &AtomicU64 {
        // SAFETY: as above; u64 fields sit on 8-byte offsets of an 8-aligned region.
        unsafe { &*self.region.add(offset as usize).cast::<AtomicU64>() }
    }
    fn features(&self) -> &AtomicU64 {
        self.u64_at(0)
    }
    fn version(&self) -> &AtomicU16 {
        self.u16_at(8)
    }
    fn desc_num_field(&self) -> &AtomicU16 {
        self.u16_at(10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.u16_at(12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.u16_at(14)
    }
    fn desc(&self, head: u16) -> u64 {
        HEADER_SIZE + DESC_SIZE * u64::from(head)
    }
    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.u8_at(self.desc(head))
    }
    fn next(&self, head: u16) -> &AtomicU16 {
        self.u16_at(self.desc(head) + 6)
    }
    fn counter_of(&self, head: u16) -> &AtomicU64 {
        self.u64_at(self.desc(head) + 8)
    }

    /// Whether this region can track a ring of `size` descriptors.
    pub fn covers(&self, size: u16) -> bool {
        size <= self.desc_num
    }

    /// A request at `head` was fetched from the avail ring.
    pub fn fetched(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.counter_of(head).store(self.counter, Ordering::Relaxed);
        self.counter += 1;
        self.inflight(head).store(1, Ordering::Release);
    }

    /// Before publishing the used entry of `head`: it is the last batch.
    pub fn before_publish(&self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.next(head).store(head, Ordering::Relaxed);
        self.last_batch_head().store(head, Ordering::Release);
    }

    /// After publishing: `head` is no longer in flight; the ring's used index is `used_idx`.
    pub fn after_publish(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.inflight(head).store(0, Ordering::Release);
        }
        self.used_idx().store(used_idx, Ordering::Release);
    }

    /// (Re)connect of a ring of `ring_size` descriptors whose used index is `ring_used`.
    pub fn recover(&mut self, ring_used: u16, ring_size: u16, features: u64) -> Recovery {
        let mut recovery = Recovery::default();
        let limit = ring_size.min(self.desc_num);
        if self.version().load(Ordering::Acquire) == 0 {
            for head in 0..self.desc_num {
                self.inflight(head).store(0, Ordering::Relaxed);
            }
            self.features().store(features, Ordering::Relaxed);
            self.desc_num_field().store(ring_size, Ordering::Relaxed);
            self.last_batch_head().store(0, Ordering::Relaxed);
            // The ring may have completions from before this buffer existed: start from them.
            self.used_idx().store(ring_used, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            self.counter = 0;
            recovery.fresh = true;
            return recovery;
        }
        let stored_used = self.used_idx().load(Ordering::Acquire);
        if stored_used != ring_used {
            // Published but not cleared: clear the last batch (ring_used - stored_used entries
            // linked from last_batch_head), bounded by the ring size against a bad buffer.
            let count = ring_used.wrapping_sub(stored_used).min(limit);
            let mut head = self.last_batch_head().load(Ordering::Acquire);
            for _ in 0..count {
                if head >= limit {
                    break;
                }
                if self.inflight(head).swap(0, Ordering::AcqRel) == 1 {
                    recovery.repaired += 1;
                }
                let next = self.next(head).load(Ordering::Acquire);
                if next == head {
                    break;
                }
                head = next;
            }
            self.used_idx().store(ring_used, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.desc_num {
            if self.inflight(head).load(Ordering::Acquire) != 1 {
                continue;
            }
            if head >= limit {
                log::warn!("in-flight entry {head} is outside a ring of {ring_size}; dropped");
                self.inflight(head).store(0, Ordering::Release);
                continue;
            }
            pending.push((self.counter_of(head).load(Ordering::Acquire), head));
        }
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |(c, _)| c.wrapping_add(1));
        recovery.resubmit = pending.into_iter().map(|(_, head)| head).collect();
        recovery
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(size: u16) -> (File, InflightQueue) {
        let (map, file, len) = InflightMap::create(2, size).unwrap();
        assert_eq!(len, 2 * queue_region_size(size));
        let map = Arc::new(map);
        (file, map.queue(1).unwrap())
    }

    #[test]
    fn fresh_buffer_takes_the_rings_used_index() {
        let (_f, mut q) = queue(8);
        let r = q.recover(5, 8, 1);
        assert!(r.fresh && r.resubmit.is_empty());
        assert_eq!(q.used_idx().load(Ordering::Relaxed), 5);
        assert_eq!(q.version().load(Ordering::Relaxed), VERSION);
    }

    #[test]
    fn in_flight_entries_come_back_in_fetch_order() {
        let (f, mut q) = queue(8);
        q.recover(0, 8, 0);
        for head in [3, 1, 6, 2] {
            q.fetched(head);
        }
        q.before_publish(1);
        q.after_publish(1, 1);
        // A new backend maps the same buffer.
        let map = Arc::new(InflightMap::map(&f, 2 * queue_region_size(8), 0, 2, 8).unwrap());
        let mut again = map.queue(1).unwrap();
        let r = again.recover(1, 8, 0);
        assert_eq!(r.resubmit, vec![3, 6, 2]);
        assert!(!r.fresh);
        // Fetch numbers continue after the newest.
        again.fetched(1);
        assert_eq!(again.counter_of(1).load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_published_but_uncleared_batch_is_not_resubmitted() {
        let (_f, mut q) = queue(8);
        q.recover(0, 8, 0);
        q.fetched(4);
        q.fetched(5);
        q.before_publish(5);
        // Crash after the used entry was published (ring used 1), before clearing.
        let r = q.recover(1, 8, 0);
        assert_eq!(r.repaired, 1);
        assert_eq!(r.resubmit, vec![4]);
        assert_eq!(q.used_idx().load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bad_geometry_and_sizes_are_refused() {
        assert!(check_geometry(0, 8, 2).is_err());
        assert!(check_geometry(3, 8, 2).is_err());
        assert!(check_geometry(1, 0, 2).is_err());
        let (_m, f, len) = InflightMap::create(1, 8).unwrap();
        assert!(InflightMap::map(&f, len - 1, 0, 1, 8).is_err());
        assert!(InflightMap::map(&f, len, 4, 1, 8).is_err());
        assert!(InflightMap::map(&f, len, 64, 1, 8).is_err());
        assert!(InflightMap::map(&f, len, 0, 2, 8).is_err());
    }
}
