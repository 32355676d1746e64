//! One virtio-blk request queue: request slots (header + status) in frontend memory, chains
//! on a [`SplitQueue`], completions by polling the used ring and sleeping on the call eventfd.
//!
//! Submission is two-step so a batch costs one kick: [`BlkQueue::enqueue`] any number of
//! requests, then [`BlkQueue::commit`] (publish the avail index, kick if the backend wants it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::vhost::memory::{FrontendMemory, GuestBuf, MemoryError};
use crate::vhost::vring::{RawDescriptor, Segment, SplitQueue, VringError};

use super::request::{
    BlkCompletion, BlkHeader, BlkRange, BlkRequest, BlkStatus, HEADER_SIZE, ID_BYTES, SECTOR_SIZE,
    STATUS_UNWRITTEN,
};

/// Bytes per request slot: header at 0, status byte at 16.
const SLOT_SIZE: u64 = 32;
const STATUS_OFFSET: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Vring(#[from] VringError),
    #[error("queue {queue} request buffers: {source}")]
    Memory { queue: u16, source: MemoryError },
    #[error("queue {queue}: all {size} request slots are in flight")]
    NoSlot { queue: u16, size: u16 },
}

/// How the driver waits and notifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// How long one blocking wait may take before it fails with a timeout.
    pub timeout: Duration,
    /// Busy-poll the used ring this long (with calls suppressed) before sleeping on the call
    /// eventfd; zero sleeps at once.
    pub spin: Duration,
    /// Kick after every commit, whatever the backend's `avail_event` / NO_NOTIFY says.
    pub always_kick: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            timeout: Duration::from_secs(10),
            spin: Duration::ZERO,
            always_kick: false,
        }
    }
}

/// Where a request's header and status live: for hand-built (malformed) chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSlot {
    pub header: GuestBuf,
    pub status: GuestBuf,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    tag: u64,
    slot: u16,
}

pub struct BlkQueue {
    vq: SplitQueue,
    slots: GuestBuf,
    free_slots: Vec<u16>,
    /// Per descriptor head.
    pending: Vec<Option<Pending>>,
    /// Completions seen while waiting for something else.
    stash: VecDeque<BlkCompletion>,
    scratch: Vec<Segment>,
    opts: QueueOptions,
}

impl std::fmt::Debug for BlkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkQueue")
            .field("vq", &self.vq)
            .field("opts", &self.opts)
            .finish()
    }
}

impl BlkQueue {
    pub fn new(
        mem: &Arc<FrontendMemory>,
        index: u16,
        size: u16,
        opts: QueueOptions,
    ) -> Result<Self, QueueError> {
        let vq = SplitQueue::new(mem, index, size)?;
        let slots = mem
            .alloc_zeroed(u64::from(size) * SLOT_SIZE, 64)
            .map_err(|source| QueueError::Memory {
                queue: index,
                source,
            })?;
        Ok(BlkQueue {
            vq,
            slots,
            free_slots: (0..size).rev().collect(),
            pending: vec![None; usize::from(size)],
            stash: VecDeque::new(),
            scratch: Vec::new(),
            opts,
        })
    }

    pub fn index(&self) -> u16 {
        self.vq.index()
    }

    pub fn vring(&self) -> &SplitQueue {
        &self.vq
    }

    /// The ring itself, for protocol tests that go below requests.
    pub fn vring_mut(&mut self) -> &mut SplitQueue {
        &mut self.vq
    }

    pub fn memory(&self) -> &Arc<FrontendMemory> {
        self.vq.memory()
    }

    pub fn options(&self) -> QueueOptions {
        self.opts
    }

    pub fn set_options(&mut self, opts: QueueOptions) {
        self.opts = opts;
    }

    pub fn in_flight(&self) -> u16 {
        self.vq.in_flight()
    }

    fn mem_err(&self) -> impl Fn(MemoryError) -> QueueError {
        let queue = self.vq.index();
        move |source| QueueError::Memory { queue, source }
    }

    fn take_slot(&mut self) -> Result<(u16, RequestSlot), QueueError> {
        let slot = self.free_slots.pop().ok_or(QueueError::NoSlot {
            queue: self.vq.index(),
            size: self.vq.size(),
        })?;
        let base = self.slots.gpa + u64::from(slot) * SLOT_SIZE;
        Ok((
            slot,
            RequestSlot {
                header: GuestBuf {
                    gpa: base,
                    len: HEADER_SIZE,
                },
                status: GuestBuf {
                    gpa: base + STATUS_OFFSET,
                    len: 1,
                },
            },
        ))
    }

    fn prepare_slot(
        &mut self,
        header: Option<&BlkHeader>,
    ) -> Result<(u16, RequestSlot), QueueError> {
        let (slot, s) = self.take_slot()?;
        let mem = Arc::clone(self.vq.memory());
        let written = header
            .map_or(Ok(()), |h| mem.write(s.header.gpa, &h.encode()))
            .and_then(|()| mem.write(s.status.gpa, &[STATUS_UNWRITTEN]));
        if let Err(e) = written {
            self.free_slots.push(slot);
            return Err(self.mem_err()(e));
        }
        Ok((slot, s))
    }

    /// Writes the request's chain (header, data, status) and makes it available, unpublished.
    /// Returns the chain's head.
    pub fn enqueue(&mut self, req: &BlkRequest) -> Result<u16, QueueError> {
        self.enqueue_parts(&req.header, &req.data, req.tag)
    }

    /// [`Self::enqueue`] without a [`BlkRequest`] (no allocation: for load loops).
    pub fn enqueue_parts(
        &mut self,
        header: &BlkHeader,
        data: &[Segment],
        tag: u64,
    ) -> Result<u16, QueueError> {
        let (slot, s) = self.prepare_slot(Some(header))?;
        let mut segs = std::mem::take(&mut self.scratch);
        segs.clear();
        segs.push(Segment::readable(s.header));
        segs.extend_from_slice(data);
        segs.push(Segment::writable(s.status));
        let r = self.vq.add_chain(&segs);
        self.scratch = segs;
        match r {
            Ok(head) => {
                self.pending[usize::from(head)] = Some(Pending { tag, slot });
                Ok(head)
            }
            Err(e) => {
                self.free_slots.push(slot);
                Err(e.into())
            }
        }
    }

    /// Makes a hand-built chain available (unpublished): `build` gets a fresh request slot
    /// (its header written from `header` when given, its status byte set to 0xff) and returns
    /// the descriptors, written exactly as given. The completion's status is read from the
    /// slot's status byte.
    pub fn enqueue_raw(
        &mut self,
        header: Option<&BlkHeader>,
        tag: u64,
        build: impl FnOnce(RequestSlot) -> Vec<RawDescriptor>,
    ) -> Result<u16, QueueError> {
        let (slot, s) = self.prepare_slot(header)?;
        let descs = build(s);
        match self.vq.add_raw_chain(&descs) {
            Ok(head) => {
                self.pending[usize::from(head)] = Some(Pending { tag, slot });
                Ok(head)
            }
            Err(e) => {
                self.free_slots.push(slot);
                Err(e.into())
            }
        }
    }

    /// Publishes what was enqueued and kicks when needed (always, with `always_kick`).
    pub fn commit(&mut self) -> Result<(), QueueError> {
        self.vq.publish()?;
        if self.opts.always_kick {
            self.vq.kick()?;
        } else {
            self.vq.notify()?;
        }
        Ok(())
    }

    /// Enqueue + commit.
    pub fn submit(&mut self, req: &BlkRequest) -> Result<u16, QueueError> {
        let head = self.enqueue(req)?;
        self.commit()?;
        Ok(head)
    }

    fn complete(&mut self, head: u16, used_len: u32) -> Result<BlkCompletion, QueueError> {
        // Only heads the vring tracked as in flight come back from pop_used, and every such
        // head got a pending entry when it was enqueued (add_raw_head chains never reach here:
        // their heads are reported as bogus by the vring).
        let p = self.pending[usize::from(head)]
            .take()
            .ok_or(VringError::BogusUsedId {
                queue: self.vq.index(),
                id: u32::from(head),
            })?;
        let mut b = [STATUS_UNWRITTEN];
        let status_gpa = self.slots.gpa + u64::from(p.slot) * SLOT_SIZE + STATUS_OFFSET;
        let read = self.vq.memory().read(status_gpa, &mut b);
        self.free_slots.push(p.slot);
        read.map_err(self.mem_err())?;
        Ok(BlkCompletion {
            tag: p.tag,
            head,
            status: BlkStatus::from(b[0]),
            used_len,
        })
    }

    /// Moves every completion now in the used ring (and any stashed earlier) into `out`.
    pub fn poll(&mut self, out: &mut Vec<BlkCompletion>) -> Result<usize, QueueError> {
        let before = out.len();
        out.extend(self.stash.drain(..));
        self.poll_ring(out)?;
        Ok(out.len() - before)
    }

    fn poll_ring(&mut self, out: &mut Vec<BlkCompletion>) -> Result<usize, QueueError> {
        let before = out.len();
        while let Some(u) = self.vq.pop_used()? {
            out.push(self.complete(u.head, u.len)?);
        }
        Ok(out.len() - before)
    }

    /// Waits until `out` has gained at least `min` completions (fewer if fewer are in flight),
    /// spinning first when the options say so, then sleeping on the call eventfd, failing at
    /// `deadline`.
    pub fn wait_deadline(
        &mut self,
        min: usize,
        deadline: Instant,
        out: &mut Vec<BlkCompletion>,
    ) -> Result<usize, QueueError> {
        let stashed = self.stash.len();
        out.extend(self.stash.drain(..));
        if stashed >= min {
            return Ok(stashed);
        }
        Ok(stashed + self.wait_ring(min - stashed, deadline, out)?)
    }

    /// Like [`Self::wait_deadline`], counting only completions new from the used ring.
    fn wait_ring(
        &mut self,
        min: usize,
        deadline: Instant,
        out: &mut Vec<BlkCompletion>,
    ) -> Result<usize, QueueError> {
        let start = out.len();
        let target = min.min(usize::from(self.vq.in_flight()));
        let done = |out: &Vec<BlkCompletion>| out.len() - start >= target;
        self.poll_ring(out)?;
        if done(out) {
            return Ok(out.len() - start);
        }
        if !self.opts.spin.is_zero() {
            self.vq.suppress_call()?;
            let spin_until = Instant::now() + self.opts.spin;
            while Instant::now() < spin_until {
                self.poll_ring(out)?;
                if done(out) {
                    return Ok(out.len() - start);
                }
                std::hint::spin_loop();
            }
        }
        loop {
            // enable_call says whether something arrived meanwhile: then do not sleep.
            if !self.vq.enable_call()? {
                self.vq.wait_call(deadline)?;
            }
            self.poll_ring(out)?;
            if done(out) {
                return Ok(out.len() - start);
            }
        }
    }

    /// [`Self::wait_deadline`] with the queue's timeout.
    pub fn wait(&mut self, min: usize, out: &mut Vec<BlkCompletion>) -> Result<usize, QueueError> {
        let deadline = Instant::now() + self.opts.timeout;
        self.wait_deadline(min, deadline, out)
    }

    /// Submits one request and waits for it; completions of other requests are kept for the
    /// next [`Self::poll`] / [`Self::wait`].
    pub fn run(&mut self, req: &BlkRequest) -> Result<BlkCompletion, QueueError> {
        let head = self.submit(req)?;
        let deadline = Instant::now() + self.opts.timeout;
        let mut got = Vec::new();
        loop {
            got.clear();
            self.wait_ring(1, deadline, &mut got)?;
            let mine = got.iter().position(|c| c.head == head);
            if let Some(i) = mine {
                let c = got.swap_remove(i);
                self.stash.extend(got.drain(..));
                return Ok(c);
            }
            self.stash.extend(got.drain(..));
        }
    }

    fn with_buf<T>(
        &mut self,
        len: u64,
        f: impl FnOnce(&mut Self, GuestBuf) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let mem = Arc::clone(self.vq.memory());
        let buf = mem.alloc(len.max(1), 4096).map_err(self.mem_err())?;
        let r = f(self, buf);
        // Freed only after completion (or on an error that left nothing in flight using it…
        // except a timeout, where the backend may still write: then the buffer stays leaked).
        if !matches!(r, Err(QueueError::Vring(VringError::Timeout { .. }))) {
            let _ = mem.free(buf);
        }
        r
    }

    /// Reads `len` bytes at byte offset `sector * 512` as one data descriptor.
    pub fn read(&mut self, sector: u64, len: u64) -> Result<(BlkStatus, Vec<u8>), QueueError> {
        self.read_segmented(sector, &[len])
    }

    /// Reads with one data descriptor per entry of `seg_lens`.
    pub fn read_segmented(
        &mut self,
        sector: u64,
        seg_lens: &[u64],
    ) -> Result<(BlkStatus, Vec<u8>), QueueError> {
        let total: u64 = seg_lens.iter().sum();
        self.with_buf(total, |q, buf| {
            let segs = split(buf, seg_lens);
            let c = q.run(&BlkRequest::read(sector, &segs))?;
            let data =
                q.vq.memory()
                    .read_vec(buf.slice(0, total))
                    .map_err(q.mem_err())?;
            Ok((c.status, data))
        })
    }

    /// Writes `data` at `sector` as one data descriptor.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<BlkStatus, QueueError> {
        self.write_segmented(sector, data, &[data.len() as u64])
    }

    /// Writes `data` with one data descriptor per entry of `seg_lens` (which sum to its length).
    pub fn write_segmented(
        &mut self,
        sector: u64,
        data: &[u8],
        seg_lens: &[u64],
    ) -> Result<BlkStatus, QueueError> {
        self.with_buf(data.len() as u64, |q, buf| {
            q.vq.memory().write(buf.gpa, data).map_err(q.mem_err())?;
            let segs = split(buf, seg_lens);
            Ok(q.run(&BlkRequest::write(sector, &segs))?.status)
        })
    }

    pub fn flush(&mut self) -> Result<BlkStatus, QueueError> {
        Ok(self.run(&BlkRequest::flush())?.status)
    }

    /// GET_ID: the status and the 20 bytes the device wrote (zeros where it wrote nothing).
    pub fn get_id(&mut self) -> Result<(BlkStatus, [u8; ID_BYTES]), QueueError> {
        self.with_buf(ID_BYTES as u64, |q, buf| {
            let buf = buf.slice(0, ID_BYTES as u64);
            q.vq.memory()
                .fill(buf.gpa, buf.len, 0)
                .map_err(q.mem_err())?;
            let c = q.run(&BlkRequest::get_id(buf))?;
            let mut id = [0u8; ID_BYTES];
            q.vq.memory().read(buf.gpa, &mut id).map_err(q.mem_err())?;
            Ok((c.status, id))
        })
    }

    pub fn discard(&mut self, ranges: &[BlkRange]) -> Result<BlkStatus, QueueError> {
        self.ranged(ranges, BlkRequest::discard)
    }

    pub fn write_zeroes(&mut self, ranges: &[BlkRange]) -> Result<BlkStatus, QueueError> {
        self.ranged(ranges, BlkRequest::write_zeroes)
    }

    fn ranged(
        &mut self,
        ranges: &[BlkRange],
        make: fn(GuestBuf) -> BlkRequest,
    ) -> Result<BlkStatus, QueueError> {
        let raw = BlkRange::encode_all(ranges);
        self.with_buf(raw.len() as u64, |q, buf| {
            q.vq.memory().write(buf.gpa, &raw).map_err(q.mem_err())?;
            Ok(q.run(&make(buf.slice(0, raw.len() as u64)))?.status)
        })
    }
}

impl Drop for BlkQueue {
    fn drop(&mut self) {
        // Allocated in `new`, freed only here.
        let _ = self.vq.memory().free(self.slots);
    }
}

/// Splits `buf` into consecutive pieces of `lens` bytes.
fn split(buf: GuestBuf, lens: &[u64]) -> Vec<GuestBuf> {
    let mut off = 0;
    lens.iter()
        .map(|&l| {
            let b = buf.slice(off, l);
            off += l;
            b
        })
        .collect()
}

/// Byte offset → sector, for callers that think in bytes.
pub fn sector_of(offset: u64) -> u64 {
    offset / SECTOR_SIZE
}
