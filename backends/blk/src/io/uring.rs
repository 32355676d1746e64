//! io_uring I/O: one ring per queue worker. Reads, writes and flushes are queued as SQEs
//! (IORING_OP_READV / WRITEV / FSYNC with DATASYNC) and submitted without waiting; each
//! request completes when its CQE arrives, in whatever order the kernel finishes them.
//!
//! The ring has an eventfd registered (IORING_REGISTER_EVENTFD): the kernel signals it for every
//! CQE. The queue worker's epoll waits on that eventfd beside the kick eventfd (see
//! `BlkSession::register_completion_fds`). Page-cache hits complete inline during submission;
//! the worker clears the eventfd and reaps them right after submitting, which saves the epoll
//! round trip. (IORING_REGISTER_EVENTFD_ASYNC would skip those signals, but it also skips
//! completions posted through task_work, e.g. buffered reads retried after a page-cache
//! wait, which are posted from the submitting thread: a lost wakeup. It hung 128K sequential
//! reads here.)
//!
//! Buffered reads (and buffered writes where the filesystem supports it) first try one
//! preadv2/pwritev2 with RWF_NOWAIT: a page-cache hit then completes at once for the cost of one
//! syscall, and only what would block goes to the ring. Buffered writes on a filesystem that
//! answers RWF_NOWAIT with EOPNOTSUPP are done in the worker, as the sync engine does.
//!
//! Discard and write-zeroes stay synchronous (fallocate / BLKDISCARD through [`SyncIo`]): they
//! are rare, and io_uring's IORING_OP_FALLOCATE would be punted to a kernel worker anyway. So
//! does an O_DIRECT request whose guest buffers are not aligned (through the bounce buffer).
//!
//! Guest memory stays mapped while the kernel may touch it: every in-flight request holds the
//! memory snapshot it was built from, and dropping the engine waits for every in-flight request.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::sync::{self, SyncIo};
use super::IoError;
use crate::disk::Disk;
use crate::request::GuestRange;
use crate::GuestMem;

/// At most this many iovecs per SQE (UIO_MAXIOV); a longer request continues in further SQEs.
const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;
/// io_uring's largest ring (IORING_MAX_ENTRIES).
const MAX_RING_ENTRIES: u32 = 32768;

/// Whether io_uring can be used here: makes (and drops) a tiny ring. Fails with ENOSYS on
/// kernels without io_uring, EPERM where `kernel.io_uring_disabled` or a seccomp filter forbids it.
pub fn probe() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

/// What became of a read or write handed to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// On the ring: its result comes from [`UringIo::reap`].
    Ring,
    /// Done already: every byte moved from the page cache without blocking.
    Done,
    /// Not taken: do it with [`UringIo::sync`] (empty requests, O_DIRECT requests whose guest
    /// buffers are not aligned, buffered writes where RWF_NOWAIT is unsupported).
    UseSync,
}

/// What the worker needs back when a request completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// Head descriptor index of the chain (the used entry's id).
    pub head: u16,
    /// Guest address of the status byte.
    pub status: vm_memory::GuestAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
        }
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    pub tag: Tag,
    pub kind: Kind,
    /// Bytes the request moved (the request's length when it succeeded).
    pub len: u32,
    pub result: Result<(), IoError>,
}

/// One request in flight.
struct Slot {
    tag: Tag,
    kind: Kind,
    /// The request's iovecs into guest memory. Not touched while an SQE points at them, so the
    /// heap buffer the kernel reads stays put even when `slots` itself reallocates.
    iovecs: Vec<libc::iovec>,
    /// First iovec not yet fully transferred.
    start: usize,
    offset: u64,
    len: u64,
    done: u64,
    /// Keeps the guest memory mapped until the kernel is done with the iovecs.
    mem: Option<Arc<GuestMem>>,
}

/// One worker thread's io_uring engine.
pub struct UringIo {
    ring: IoUring,
    event: EventFd,
    disk: Arc<Disk>,
    /// For discard, write-zeroes and unaligned O_DIRECT requests.
    sync: SyncIo,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
    /// The guest memory the last request was built from, shared by the requests in flight.
    mem: Option<Arc<GuestMem>>,
    /// (slot, result) of the CQEs being reaped; kept between calls only for the capacity.
    cqes: Vec<(usize, i32)>,
    /// Whether buffered writes are tried with RWF_NOWAIT first (cleared when the filesystem
    /// answers EOPNOTSUPP).
    nowait_writes: bool,
    /// Whether buffered I/O is tried with RWF_NOWAIT first at all (tests turn it off to drive
    /// the ring).
    nowait: bool,
}

// SAFETY: the raw iovec pointers in `slots` point into guest memory that the slot's own
// `Arc<GuestMem>` keeps mapped; they are only dereferenced by the kernel. The engine is owned by
// one queue worker and moves between threads only as a whole (behind the worker's mutex).
unsafe impl Send for UringIo {}

impl UringIo {
    /// Makes the ring (`entries` rounded up to a power of two, at least as many as the queue
    /// can have requests in flight) and its completion eventfd.
    pub fn new(disk: Arc<Disk>, entries: u32) -> io::Result<Self> {
        let entries = entries.clamp(8, MAX_RING_ENTRIES).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(UringIo {
            ring,
            event,
            sync: SyncIo::new(disk.clone()),
            disk,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            mem: None,
            cqes: Vec::new(),
            nowait_writes: true,
            nowait: true,
        })
    }

    /// The eventfd the kernel signals when a request completes asynchronously.
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        self.event.as_raw_fd()
    }

    /// Requests submitted whose completion has not been reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The synchronous engine, for the operations that stay synchronous.
    pub fn sync(&mut self) -> &mut SyncIo {
        &mut self.sync
    }

    /// Reads `len` bytes at `offset` into `ranges`: from the page cache at once where every
    /// byte is there, through the ring otherwise.
    pub fn read(
        &mut self,
        tag: Tag,
        mem: &GuestMem,
        offset: u64,
        ranges: &[GuestRange],
        len: u32,
    ) -> Result<Queued, IoError> {
        self.transfer(Kind::Read, tag, mem, offset, ranges, len)
    }

    /// Queues a write; see [`UringIo::read`].
    pub fn write(
        &mut self,
        tag: Tag,
        mem: &GuestMem,
        offset: u64,
        ranges: &[GuestRange],
        len: u32,
    ) -> Result<Queued, IoError> {
        self.transfer(Kind::Write, tag, mem, offset, ranges, len)
    }

    /// Queues an fdatasync of the image.
    pub fn flush(&mut self, tag: Tag) {
        let slot = self.slot(tag, Kind::Flush, 0, 0, None);
        self.in_flight += 1;
        self.push(slot);
    }

    fn transfer(
        &mut self,
        kind: Kind,
        tag: Tag,
        mem: &GuestMem,
        offset: u64,
        ranges: &[GuestRange],
        len: u32,
    ) -> Result<Queued, IoError> {
        // Buffered writes where the filesystem refuses RWF_NOWAIT (ext4, for one) would only be
        // handed by io_uring to an io-wq thread doing the same blocking pwritev (and writers to
        // one file serialise on its inode lock anyway): doing them in the worker measured 1.5–2×
        // faster for 4K random writes at QD32 here.
        let blocking_write = kind == Kind::Write && !self.disk.direct() && !self.nowait_writes;
        if len == 0 || blocking_write {
            return Ok(Queued::UseSync);
        }
        let snapshot = self.snapshot(mem);
        let index = self.slot(tag, kind, offset, u64::from(len), Some(snapshot));
        let built = {
            let iovecs = &mut self.slots[index].iovecs;
            sync::build_iovecs(mem, ranges, iovecs).map(|()| sync::aligned(iovecs))
        };
        match built {
            Ok(_) if !self.disk.direct() => {
                if self.try_nowait(index) {
                    self.release(index);
                    return Ok(Queued::Done);
                }
                self.in_flight += 1;
                self.push(index);
                Ok(Queued::Ring)
            }
            Ok(true) => {
                self.in_flight += 1;
                self.push(index);
                Ok(Queued::Ring)
            }
            other => {
                self.release(index);
                // Bad guest memory fails the request; O_DIRECT with unaligned guest buffers
                // goes to the sync engine's bounce buffer.
                other.map(|_| Queued::UseSync)
            }
        }
    }

    /// Buffered I/O: one preadv2/pwritev2 with RWF_NOWAIT, which moves what the page cache
    /// can serve without blocking. True when that was everything; otherwise the slot's cursor
    /// is past what moved and the ring does the rest. Page-cache hits thus cost one syscall, as
    /// with the sync engine, instead of an SQE, an io_uring_enter and a CQE; misses (and writes
    /// that would wait for writeback or allocation) still never block the worker.
    fn try_nowait(&mut self, index: usize) -> bool {
        let slot = &mut self.slots[index];
        if !self.nowait || (slot.kind == Kind::Write && !self.nowait_writes) {
            return false;
        }
        let iov = &slot.iovecs[slot.start..];
        let count = iov.len().min(MAX_IOVECS) as libc::c_int;
        let fd = self.disk.file().as_raw_fd();
        let at = (slot.offset + slot.done) as libc::off_t;
        // SAFETY: `iov` points to `count` iovecs describing guest memory that the caller's
        // snapshot keeps mapped for the duration of the call; the kernel copies bytes, no Rust
        // reference to that memory exists. Offsets were checked against the capacity.
        let n = unsafe {
            if slot.kind == Kind::Read {
                libc::preadv2(fd, iov.as_ptr(), count, at, libc::RWF_NOWAIT)
            } else {
                libc::pwritev2(fd, iov.as_ptr(), count, at, libc::RWF_NOWAIT)
            }
        };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                // The filesystem has no RWF_NOWAIT for this kind (ext4 for buffered writes,
                // FUSE for both): stop paying a failing syscall per request.
                if slot.kind == Kind::Write {
                    self.nowait_writes = false;
                } else {
                    self.nowait = false;
                }
            }
            // EAGAIN (would block) and real errors alike: the ring does it and reports.
            return false;
        }
        // n >= 0 and at most the bytes the iovecs describe.
        advance(slot, n as usize);
        slot.done == slot.len
    }

    /// Submits the queued SQEs without waiting.
    pub fn submit(&mut self) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EAGAIN/EBUSY: the kernel is short of resources or the CQ is full; the SQEs
                // stay queued and go with the next submit (reaping frees CQ space).
                Err(e) => {
                    log::debug!("io_uring submit: {e}");
                    return;
                }
            }
        }
    }

    /// Waits (blocking) until at least one request completes; for draining.
    pub fn wait(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    log::warn!("io_uring wait: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    return;
                }
            }
        }
    }

    /// Whether CQEs are waiting to be reaped.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Clears the completion eventfd. Call before [`UringIo::reap`] so no wakeup is lost.
    pub fn consume_event(&self) {
        let _ = self.event.read();
    }

    /// Hands every completed request to `done`; requests that moved only part of their bytes
    /// are queued again for the rest (and submitted).
    pub fn reap(&mut self, mut done: impl FnMut(Completion)) {
        let mut requeued = false;
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data() as usize, cqe.result())),
            );
            if cqes.is_empty() {
                break;
            }
            for (index, res) in cqes.drain(..) {
                if let Some(completion) = self.complete(index, res) {
                    done(completion);
                } else {
                    requeued = true;
                }
            }
        }
        self.cqes = cqes;
        if requeued {
            self.submit();
        }
    }

    /// The CQE of slot `index` with result `res`: the request's completion, or None if it was
    /// queued again for the bytes still to move.
    fn complete(&mut self, index: usize, res: i32) -> Option<Completion> {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            self.push(index);
            return None;
        }
        let slot = &mut self.slots[index];
        let result = if res < 0 {
            let source = io::Error::from_raw_os_error(-res);
            Err(match slot.kind {
                Kind::Flush => IoError::Flush(source),
                kind => IoError::Io {
                    op: kind.name(),
                    offset: slot.offset + slot.done,
                    len: slot.len - slot.done,
                    source,
                },
            })
        } else if slot.kind == Kind::Flush {
            Ok(())
        } else if res == 0 {
            Err(IoError::Short {
                op: slot.kind.name(),
                offset: slot.offset,
                len: slot.len,
                done: slot.done,
            })
        } else {
            // res > 0 and at most the bytes the SQE's iovecs describe.
            advance(slot, res as usize);
            if slot.done < slot.len {
                self.push(index);
                return None;
            }
            Ok(())
        };
        let slot = &self.slots[index];
        let completion = Completion {
            tag: slot.tag,
            kind: slot.kind,
            // Requests are at most u32::MAX bytes long.
            len: slot.len as u32,
            result,
        };
        self.release(index);
        self.in_flight -= 1;
        Some(completion)
    }

    fn snapshot(&mut self, mem: &GuestMem) -> Arc<GuestMem> {
        match &self.mem {
            Some(current) if same_mappings(current, mem) => current.clone(),
            _ => {
                let fresh = Arc::new(mem.clone());
                self.mem = Some(fresh.clone());
                fresh
            }
        }
    }

    fn slot(
        &mut self,
        tag: Tag,
        kind: Kind,
        offset: u64,
        len: u64,
        mem: Option<Arc<GuestMem>>,
    ) -> usize {
        let fresh = |iovecs| Slot {
            tag,
            kind,
            iovecs,
            start: 0,
            offset,
            len,
            done: 0,
            mem,
        };
        match self.free.pop() {
            Some(index) => {
                let slot = &mut self.slots[index];
                let mut iovecs = std::mem::take(&mut slot.iovecs);
                iovecs.clear();
                *slot = fresh(iovecs);
                index
            }
            None => {
                self.slots.push(fresh(Vec::new()));
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.iovecs.clear();
        slot.mem = None;
        self.free.push(index);
    }

    /// Queues slot `index`'s next SQE (submitting first if the SQ is full).
    fn push(&mut self, index: usize) {
        let slot = &self.slots[index];
        let fd = types::Fd(self.disk.file().as_raw_fd());
        let entry = match slot.kind {
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            kind => {
                let iov = &slot.iovecs[slot.start..];
                let count = iov.len().min(MAX_IOVECS) as u32;
                let at = slot.offset + slot.done;
                if kind == Kind::Read {
                    opcode::Readv::new(fd, iov.as_ptr(), count)
                        .offset(at)
                        .build()
                } else {
                    opcode::Writev::new(fd, iov.as_ptr(), count)
                        .offset(at)
                        .build()
                }
            }
        }
        .user_data(index as u64);
        loop {
            // SAFETY: the SQE points at the slot's iovecs, which stay allocated and unchanged
            // until its CQE is reaped; they describe guest memory the slot's snapshot keeps
            // mapped. The image fd lives as long as `self.disk`, which outlives the ring's
            // in-flight requests (Drop waits for them).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // SQ full: hand what is queued to the kernel and try again. (Cannot spin: at most
            // one SQE per request in flight, at most as many requests as the ring has entries,
            // and a CQ twice that size, so the kernel always takes the SQEs.)
            self.submit();
        }
    }
}

/// Moves slot's iovec cursor past `n` transferred bytes.
fn advance(slot: &mut Slot, n: usize) {
    slot.done += n as u64;
    let mut left = n;
    while left > 0 && slot.start < slot.iovecs.len() {
        let v = &mut slot.iovecs[slot.start];
        if left >= v.iov_len {
            left -= v.iov_len;
            slot.start += 1;
        } else {
            // SAFETY: left < iov_len, so the advanced pointer stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(left).cast() };
            v.iov_len -= left;
            left = 0;
        }
    }
    // Skip empty iovecs so the next SQE starts at real bytes.
    while slot.start < slot.iovecs.len() && slot.iovecs[slot.start].iov_len == 0 {
        slot.start += 1;
    }
}

/// Whether two memory snapshots map the same regions at the same host addresses.
fn same_mappings(a: &GuestMem, b: &GuestMem) -> bool {
    let host = |r: &vm_memory::GuestRegionMmap<()>| {
        (
            r.start_addr(),
            r.len(),
            r.get_host_address(MemoryRegionAddress(0)).ok(),
        )
    };
    a.num_regions() == b.num_regions() && a.iter().map(host).eq(b.iter().map(host))
}

impl Drop for UringIo {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory: wait for every request before
        // the snapshots (and the ring) go away. Their results have nowhere to go any more.
        let mut spins = 0;
        while self.in_flight > 0 {
            self.wait();
            let before = self.in_flight;
            self.reap(|c| log::debug!("dropping the completion of descriptor {}", c.tag.head));
            if self.in_flight == before {
                spins += 1;
                if spins > 10_000 {
                    log::error!("{} io_uring requests never completed", self.in_flight);
                    // Leak the snapshots rather than unmap memory the kernel may write.
                    for slot in &mut self.slots {
                        std::mem::forget(slot.mem.take());
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "uring_tests.rs"]
mod tests;
