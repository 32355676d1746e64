//! One queue's request loop: pop a chain, validate it, do the I/O, write the status byte,
//! publish the used entry. Owned by that queue's worker thread; nothing here is shared with
//! other queues.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::inflight::InflightQueue;

use crate::disk::Disk;
use crate::io::sync::SyncIo;
use crate::io::uring::{Completion, Kind, Queued, Tag, UringIo};
use crate::io::{EngineKind, IoError};
use crate::request::{self, GuestRange, Limits, Op};
use crate::GuestMem;

/// Counters of one queue over one session, logged when the session ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub requests: u64,
    pub failed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

enum Engine {
    Sync(SyncIo),
    Uring(Box<UringIo>),
}

pub struct QueueWorker {
    index: u16,
    io: Engine,
    /// Completions reaped from the ring, kept between calls only for the capacity.
    completions: Vec<Completion>,
    serial: Arc<[u8]>,
    descs: Vec<Descriptor>,
    data: Vec<GuestRange>,
    scratch: Vec<GuestRange>,
    stats: QueueStats,
    /// This queue's region of the in-flight buffer (INFLIGHT_SHMFD negotiated).
    inflight: Option<InflightQueue>,
    /// Heads found in flight at (re)connect, served before anything new is popped.
    resubmit: VecDeque<u16>,
}

impl QueueWorker {
    /// A worker with the sync engine.
    pub fn new(index: u16, disk: Arc<Disk>, serial: Arc<[u8]>) -> Self {
        Self::with_engine(index, disk, serial, EngineKind::Sync, 0)
    }

    /// A worker with the given engine; `ring_entries` is the most requests the queue can have
    /// in flight (its largest size). If the ring cannot be made, the worker uses sync I/O.
    pub fn with_engine(
        index: u16,
        disk: Arc<Disk>,
        serial: Arc<[u8]>,
        engine: EngineKind,
        ring_entries: u32,
    ) -> Self {
        let io = match engine {
            EngineKind::Sync => Engine::Sync(SyncIo::new(disk)),
            EngineKind::Uring => match UringIo::new(disk.clone(), ring_entries) {
                Ok(uring) => Engine::Uring(Box::new(uring)),
                Err(e) => {
                    log::warn!("queue {index}: cannot set up io_uring ({e}); using sync I/O");
                    Engine::Sync(SyncIo::new(disk))
                }
            },
        };
        QueueWorker {
            index,
            io,
            completions: Vec::new(),
            serial,
            descs: Vec::new(),
            data: Vec::new(),
            scratch: Vec::new(),
            stats: QueueStats::default(),
            inflight: None,
            resubmit: VecDeque::new(),
        }
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The engine in use.
    pub fn engine(&self) -> EngineKind {
        match self.io {
            Engine::Sync(_) => EngineKind::Sync,
            Engine::Uring(_) => EngineKind::Uring,
        }
    }

    /// With io_uring: the eventfd signalled when requests complete asynchronously; the worker
    /// thread must call [`QueueWorker::complete`] when it is readable.
    pub fn completion_fd(&self) -> Option<RawFd> {
        match &self.io {
            Engine::Sync(_) => None,
            Engine::Uring(uring) => Some(uring.completion_fd()),
        }
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        match &self.io {
            Engine::Sync(_) => 0,
            Engine::Uring(uring) => uring.in_flight(),
        }
    }

    /// Publishes the requests whose I/O has completed; returns how many used entries were
    /// published. For the completion eventfd.
    pub fn complete(&mut self, queue: &mut Queue, mem: &GuestMem) -> usize {
        if let Engine::Uring(uring) = &self.io {
            uring.consume_event();
        }
        self.reap(queue, mem)
    }

    /// Publishes io_uring completions already in the completion ring, without touching the
    /// completion eventfd (a later wakeup then finds nothing, which is harmless); for polling.
    pub fn complete_ready(&mut self, queue: &mut Queue, mem: &GuestMem) -> usize {
        let ready = match &mut self.io {
            Engine::Uring(uring) => uring.has_completions(),
            Engine::Sync(_) => false,
        };
        if ready {
            self.reap(queue, mem)
        } else {
            0
        }
    }

    /// Blocks until every submitted request has completed and is published; returns how many
    /// used entries were published.
    pub fn wait_idle(&mut self, queue: &mut Queue, mem: &GuestMem) -> usize {
        let mut used = 0;
        while let Engine::Uring(uring) = &mut self.io {
            if uring.in_flight() == 0 {
                break;
            }
            uring.wait();
            used += self.reap(queue, mem);
        }
        used
    }

    fn reap(&mut self, queue: &mut Queue, mem: &GuestMem) -> usize {
        let Engine::Uring(uring) = &mut self.io else {
            return 0;
        };
        let mut completions = std::mem::take(&mut self.completions);
        uring.reap(|c| completions.push(c));
        let mut used = 0;
        for c in completions.drain(..) {
            let len = self.finish(mem, c);
            used += usize::from(self.publish(queue, mem, len.0, len.1));
        }
        self.completions = completions;
        used
    }

    /// Status byte and counters of a completed request; returns (head, used length).
    fn finish(&mut self, mem: &GuestMem, c: Completion) -> (u16, u32) {
        let head = c.tag.head;
        match c.result {
            Ok(()) => {
                let written = match c.kind {
                    Kind::Read => {
                        self.stats.bytes_read += u64::from(c.len);
                        c.len
                    }
                    Kind::Write => {
                        self.stats.bytes_written += u64::from(c.len);
                        0
                    }
                    Kind::Flush => 0,
                };
                (
                    head,
                    self.set_status(mem, c.tag.status, VIRTIO_BLK_S_OK as u8, written + 1),
                )
            }
            Err(e) => {
                self.stats.failed += 1;
                log::warn!(
                    "queue {}: request at descriptor {head} fails with IOERR: {e}",
                    self.index
                );
                (
                    head,
                    self.set_status(mem, c.tag.status, VIRTIO_BLK_S_IOERR as u8, 1),
                )
            }
        }
    }

    /// Starts in-flight tracking on a queue that was just set up (its kick fd arrived): a fresh
    /// buffer is initialised from the ring; otherwise what was in flight is queued for
    /// resubmission and the ring resumes after it (next avail = used index + in flight).
    pub fn attach_inflight(
        &mut self,
        inflight: Option<InflightQueue>,
        queue: &mut Queue,
        mem: &GuestMem,
        features: u64,
    ) {
        self.resubmit.clear();
        self.inflight = None;
        let Some(mut inflight) = inflight else {
            return;
        };
        let size = queue.size();
        if !inflight.covers(size) {
            log::warn!(
                "queue {}: the in-flight buffer is too small for {size} descriptors; not tracking",
                self.index
            );
            return;
        }
        let used = match queue.used_idx(mem, std::sync::atomic::Ordering::Acquire) {
            Ok(used) => used.0,
            Err(e) => {
                log::warn!("queue {}: cannot read the used index: {e}", self.index);
                return;
            }
        };
        let recovery = inflight.recover(used, size, features);
        if !recovery.fresh {
            let in_flight = recovery.resubmit.len() as u16;
            queue.set_next_used(used);
            queue.set_next_avail(used.wrapping_add(in_flight));
            log::info!(
                "queue {}: resubmitting {in_flight} in-flight request(s) (used index {used}{})",
                self.index,
                if recovery.repaired > 0 {
                    format!(", {} already completed", recovery.repaired)
                } else {
                    String::new()
                }
            );
            self.resubmit.extend(recovery.resubmit);
        }
        self.inflight = Some(inflight);
    }

    fn publish(&self, queue: &mut Queue, mem: &GuestMem, head: u16, len: u32) -> bool {
        if let Some(inflight) = &self.inflight {
            inflight.before_publish(head);
        }
        let result = queue.add_used(mem, head, len);
        if let Some(inflight) = &self.inflight {
            inflight.after_publish(head, queue.next_used());
        }
        match result {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "queue {}: cannot publish used entry for descriptor {head}: {e}",
                    self.index
                );
                false
            }
        }
    }

    /// Serves every available request (or until `stopping` is set); returns how many used
    /// entries were published.
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        limits: &Limits,
        stopping: &AtomicBool,
    ) -> usize {
        let mut used = 0;
        while !stopping.load(Ordering::Relaxed) {
            let Some(head) = self.resubmit.pop_front() else {
                break;
            };
            self.descs.clear();
            let len = match read_chain(mem, queue, head, &mut self.descs) {
                Ok(()) => self.handle(head, mem, limits),
                Err(e) => {
                    self.stats.failed += 1;
                    log::warn!(
                        "queue {}: in-flight request at descriptor {head} cannot be resubmitted: {e}",
                        self.index
                    );
                    Some(0)
                }
            };
            if let Some(len) = len {
                used += usize::from(self.publish(queue, mem, head, len));
            }
        }
        while !stopping.load(Ordering::Relaxed) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            if let Some(inflight) = &mut self.inflight {
                inflight.fetched(head);
            }
            self.descs.clear();
            self.descs.extend(chain);
            // None: submitted to the ring; published when it completes.
            if let Some(len) = self.handle(head, mem, limits) {
                used += usize::from(self.publish(queue, mem, head, len));
            }
        }
        if let Engine::Uring(uring) = &mut self.io {
            uring.submit();
            // Page-cache hits complete inline during the submit: publish them now, clearing the
            // eventfd first (so a CQE that lands after this still wakes the worker) to spare the
            // thread an epoll round trip that would find nothing. With nothing completed yet
            // the eventfd has nothing to clear: the completions will wake the worker.
            if uring.has_completions() {
                used += self.complete(queue, mem);
            }
        }
        used
    }

    /// Handles the chain in `self.descs`; returns the used length (bytes written to the guest),
    /// or None when the request went to the ring.
    fn handle(&mut self, head: u16, mem: &GuestMem, limits: &Limits) -> Option<u32> {
        self.stats.requests += 1;
        let request =
            match request::parse(&self.descs, mem, limits, &mut self.data, &mut self.scratch) {
                Ok(request) => request,
                Err(rejected) => {
                    self.stats.failed += 1;
                    let code = rejected.error.status();
                    log::warn!(
                        "queue {}: request at descriptor {head} fails with {}: {}",
                        self.index,
                        status_name(code),
                        rejected.error
                    );
                    return Some(match rejected.status {
                        Some(addr) => self.set_status(mem, addr, code, 1),
                        None => 0,
                    });
                }
            };
        if let Engine::Uring(uring) = &mut self.io {
            let tag = Tag {
                head,
                status: request.status,
            };
            let queued = match &request.op {
                Op::Read { offset, len } => uring.read(tag, mem, *offset, &self.data, *len),
                Op::Write { offset, len } => uring.write(tag, mem, *offset, &self.data, *len),
                Op::Flush => {
                    uring.flush(tag);
                    Ok(Queued::Ring)
                }
                _ => Ok(Queued::UseSync),
            };
            match queued {
                Ok(Queued::Ring) => return None,
                Ok(Queued::Done) => {
                    let used = match request.op {
                        Op::Read { len, .. } => {
                            self.stats.bytes_read += u64::from(len);
                            len
                        }
                        Op::Write { len, .. } => {
                            self.stats.bytes_written += u64::from(len);
                            0
                        }
                        _ => 0,
                    };
                    return Some(self.set_status(
                        mem,
                        request.status,
                        VIRTIO_BLK_S_OK as u8,
                        used + 1,
                    ));
                }
                Ok(Queued::UseSync) => {}
                Err(e) => {
                    self.stats.failed += 1;
                    log::warn!(
                        "queue {}: request at descriptor {head} fails with IOERR: {e}",
                        self.index
                    );
                    return Some(self.set_status(mem, request.status, VIRTIO_BLK_S_IOERR as u8, 1));
                }
            }
        }
        let io = match &mut self.io {
            Engine::Sync(sync) => sync,
            Engine::Uring(uring) => uring.sync(),
        };
        let result: Result<u32, IoError> = match &request.op {
            Op::Read { offset, len } => {
                let r = io.read(mem, *offset, &self.data, *len).map(|()| *len);
                if r.is_ok() {
                    self.stats.bytes_read += u64::from(*len);
                }
                r
            }
            Op::Write { offset, len } => {
                let r = io.write(mem, *offset, &self.data, *len).map(|()| 0);
                if r.is_ok() {
                    self.stats.bytes_written += u64::from(*len);
                }
                r
            }
            Op::Flush => io.flush().map(|()| 0),
            Op::GetId { len } => self.get_id(mem, *len),
            Op::Discard(segments) => io.discard(segments).map(|()| 0),
            Op::WriteZeroes(segments) => io.write_zeroes(segments).map(|()| 0),
        };
        Some(match result {
            Ok(written) => self.set_status(mem, request.status, VIRTIO_BLK_S_OK as u8, written + 1),
            Err(e) => {
                self.stats.failed += 1;
                log::warn!(
                    "queue {}: request at descriptor {head} fails with IOERR: {e}",
                    self.index
                );
                self.set_status(mem, request.status, VIRTIO_BLK_S_IOERR as u8, 1)
            }
        })
    }

    /// Writes the status byte; returns `used_len`, or 0 if the byte could not be written.
    fn set_status(&self, mem: &GuestMem, addr: GuestAddress, code: u8, used_len: u32) -> u32 {
        match mem.write_obj(code, addr) {
            Ok(()) => used_len,
            Err(e) => {
                log::warn!(
                    "queue {}: cannot write status at {:#x}: {e}",
                    self.index,
                    addr.0
                );
                0
            }
        }
    }

    /// Writes the serial number, zero-padded to 20 bytes (or the buffer's size if smaller).
    fn get_id(&self, mem: &GuestMem, len: u32) -> Result<u32, IoError> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = self.serial.len().min(id.len());
        id[..n].copy_from_slice(&self.serial[..n]);
        let total = (len as usize).min(id.len());
        let mut done = 0;
        for range in &self.data {
            if done == total {
                break;
            }
            let n = (total - done).min(range.len as usize);
            mem.write_slice(&id[done..done + n], range.addr)
                .map_err(|_| IoError::GuestMemory {
                    addr: range.addr.0,
                    len: range.len,
                })?;
            done += n;
        }
        // total <= 20.
        Ok(total as u32)
    }
}

/// Reads the descriptor chain at `head` (following one indirect table), for resubmitting a
/// request found in the in-flight buffer: virtio-queue 0.18 builds chains only through
/// `pop_descriptor_chain` (`DescriptorChain::new` is crate-private).
fn read_chain(
    mem: &GuestMem,
    queue: &Queue,
    head: u16,
    out: &mut Vec<Descriptor>,
) -> Result<(), String> {
    let mut table = GuestAddress(queue.desc_table());
    let mut table_len = u32::from(queue.size());
    let mut index = u32::from(head);
    let mut indirect = false;
    let mut steps = 0u32;
    loop {
        if index >= table_len {
            return Err(format!(
                "descriptor {index} is outside a table of {table_len}"
            ));
        }
        steps += 1;
        if steps > table_len {
            return Err("the chain loops".into());
        }
        let addr = table
            .0
            .checked_add(u64::from(index) * 16)
            .map(GuestAddress)
            .ok_or("descriptor address overflows")?;
        let desc: Descriptor = mem
            .read_obj(addr)
            .map_err(|e| format!("cannot read descriptor {index}: {e}"))?;
        if desc.refers_to_indirect_table() {
            if indirect || !out.is_empty() || !desc.len().is_multiple_of(16) || desc.len() == 0 {
                return Err("bad indirect descriptor".into());
            }
            indirect = true;
            table = desc.addr();
            table_len = desc.len() / 16;
            index = 0;
            steps = 0;
            continue;
        }
        out.push(desc);
        if !desc.has_next() {
            return Ok(());
        }
        index = u32::from(desc.next());
    }
}

fn status_name(code: u8) -> &'static str {
    match u32::from(code) {
        VIRTIO_BLK_S_OK => "OK",
        VIRTIO_BLK_S_IOERR => "IOERR",
        _ => "UNSUPP",
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
