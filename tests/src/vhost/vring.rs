//! A split virtqueue built by hand in frontend memory, driven the way a guest driver drives it:
//! descriptor table, available ring (with `used_event` at its end) and used ring (with
//! `avail_event` at its end), a kick eventfd the frontend writes and a call eventfd the
//! backend writes.
//!
//! Ordering: descriptors and the avail ring entry are written before the avail index is
//! published with a release store; the used index is read with an acquire load before the used
//! entry; before deciding whether to kick (or to sleep on the call eventfd) a full fence
//! separates our index store from the load of the backend's event index, as in Linux's
//! `virtqueue_kick_prepare` / `virtqueue_enable_cb`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{FrontendMemory, GuestBuf, MemoryError};
pub use super::ring_format::{
    need_event, Link, QueueStats, RawDescriptor, Segment, UsedElem, VringLayout, DESC_SIZE,
    MAX_QUEUE_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum VringError {
    #[error("queue size {0} must be a power of two between 1 and 32768")]
    BadSize(u16),
    #[error("vring memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("cannot create the {which} eventfd of queue {queue}: {source}")]
    EventFd {
        queue: u16,
        which: &'static str,
        source: std::io::Error,
    },
    #[error("queue {queue}: a chain of {need} descriptors does not fit ({free} free)")]
    Full {
        queue: u16,
        need: usize,
        free: usize,
    },
    #[error("queue {queue}: a descriptor chain needs at least one descriptor")]
    EmptyChain { queue: u16 },
    #[error(
        "queue {queue}: a raw descriptor links to chain position {pos}, past its {len} descriptors"
    )]
    BadLink { queue: u16, pos: usize, len: usize },
    #[error("queue {queue}: segment at {gpa:#x} is {len} bytes, more than a descriptor holds")]
    SegmentTooLong { queue: u16, gpa: u64, len: u64 },
    #[error("queue {queue}: the backend returned descriptor head {id} in the used ring, which is not in flight")]
    BogusUsedId { queue: u16, id: u32 },
    #[error("queue {queue}: the backend moved the used index to {used} while {in_flight} requests were in flight after used index {last_used}")]
    BogusUsedIdx {
        queue: u16,
        used: u16,
        last_used: u16,
        in_flight: u16,
    },
    #[error("queue {queue}: writing the kick eventfd failed: {source}")]
    Kick { queue: u16, source: std::io::Error },
    #[error("queue {queue}: waiting on the call eventfd failed: {source}")]
    Call { queue: u16, source: nix::Error },
    #[error("queue {queue}: no completion before the deadline ({in_flight} in flight, avail idx {avail}, used idx {used} in memory, last seen {last_used})")]
    Timeout {
        queue: u16,
        in_flight: u16,
        avail: u16,
        used: u16,
        last_used: u16,
    },
}

pub struct SplitQueue {
    mem: Arc<FrontendMemory>,
    index: u16,
    area: GuestBuf,
    layout: VringLayout,
    free: Vec<u16>,
    /// Per head: the descriptor indices of the chain in flight there (empty: none).
    chains: Vec<Vec<u16>>,
    in_flight: u16,
    next_avail: u16,
    last_kick_avail: u16,
    last_used: u16,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
    stats: QueueStats,
}

impl std::fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("index", &self.index)
            .field("layout", &self.layout)
            .field("in_flight", &self.in_flight)
            .field("next_avail", &self.next_avail)
            .field("last_used", &self.last_used)
            .finish()
    }
}

impl SplitQueue {
    /// A zeroed ring of `size` entries for queue `index`, with fresh eventfds.
    pub fn new(mem: &Arc<FrontendMemory>, index: u16, size: u16) -> Result<Self, VringError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(VringError::BadSize(size));
        }
        let (rel, len) = VringLayout::plan(size);
        let area = mem.alloc_zeroed(len, 4096)?;
        let layout = VringLayout {
            size,
            desc: area.gpa + rel.desc,
            avail: area.gpa + rel.avail,
            used: area.gpa + rel.used,
        };
        let eventfd = |which| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| VringError::EventFd {
                queue: index,
                which,
                source,
            })
        };
        let kick = eventfd("kick");
        let call = eventfd("call");
        let (kick, call) = match (kick, call) {
            (Ok(k), Ok(c)) => (k, c),
            (Err(e), _) | (_, Err(e)) => {
                let _ = mem.free(area);
                return Err(e);
            }
        };
        Ok(SplitQueue {
            mem: Arc::clone(mem),
            index,
            area,
            layout,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            in_flight: 0,
            next_avail: 0,
            last_kick_avail: 0,
            last_used: 0,
            event_idx: false,
            kick,
            call,
            stats: QueueStats::default(),
        })
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    pub fn layout(&self) -> VringLayout {
        self.layout
    }

    pub fn memory(&self) -> &Arc<FrontendMemory> {
        &self.mem
    }

    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated: decides which notification fields count.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Chains made available and not yet seen in the used ring.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The avail index the driver has reached (published or not).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The used index the driver has consumed up to.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// The used index as it is in memory now (what a reconnecting frontend resumes from).
    pub fn used_idx(&self) -> Result<u16, VringError> {
        Ok(self.mem.load_u16(self.layout.used + 2, Ordering::Acquire)?)
    }

    /// The avail index as published in memory.
    pub fn avail_idx(&self) -> Result<u16, VringError> {
        Ok(self
            .mem
            .load_u16(self.layout.avail + 2, Ordering::Acquire)?)
    }

    fn write_desc(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), VringError> {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.layout.desc + u64::from(index) * DESC_SIZE;
        Ok(self.mem.write(at, &raw)?)
    }

    /// Takes `n` free descriptors; the first is the chain's head. The list reuses the head's
    /// (empty) chain vector, so steady-state submission does not allocate.
    fn take_descriptors(&mut self, n: usize) -> Result<Vec<u16>, VringError> {
        if n == 0 {
            return Err(VringError::EmptyChain { queue: self.index });
        }
        if n > self.free.len() {
            return Err(VringError::Full {
                queue: self.index,
                need: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let head = usize::from(self.free[at]);
        let mut chain = std::mem::take(&mut self.chains[head]);
        chain.clear();
        chain.extend_from_slice(&self.free[at..]);
        self.free.truncate(at);
        Ok(chain)
    }

    /// Gives back descriptors taken for a chain that was not made available.
    fn untake(&mut self, mut chain: Vec<u16>) {
        self.free.extend_from_slice(&chain);
        if let Some(&head) = chain.first() {
            chain.clear();
            self.chains[usize::from(head)] = chain;
        }
    }

    fn make_available(&mut self, head: u16, chain: Vec<u16>) -> Result<(), VringError> {
        let slot = usize::from(head);
        self.chains[slot] = chain;
        self.mem.store_u16(
            self.layout.avail_ring(self.next_avail),
            head,
            Ordering::Relaxed,
        )?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.in_flight += 1;
        Ok(())
    }

    /// Writes a well-formed chain and puts its head in the avail ring (not yet published).
    pub fn add_chain(&mut self, segments: &[Segment]) -> Result<u16, VringError> {
        let chain = self.take_descriptors(segments.len())?;
        let result = (|| {
            for (i, seg) in segments.iter().enumerate() {
                let mut flags = 0u16;
                if seg.device_writes {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                let next = match chain.get(i + 1) {
                    Some(&n) => {
                        flags |= VRING_DESC_F_NEXT as u16;
                        n
                    }
                    None => 0,
                };
                let len = u32::try_from(seg.len).map_err(|_| VringError::SegmentTooLong {
                    queue: self.index,
                    gpa: seg.gpa,
                    len: seg.len,
                })?;
                self.write_desc(chain[i], seg.gpa, len, flags, next)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.untake(chain);
            return Err(e);
        }
        let head = chain[0];
        self.make_available(head, chain)?;
        Ok(head)
    }

    /// Writes descriptors exactly as given (flags, lengths, links) into freshly reserved table
    /// entries and puts the first one in the avail ring (not yet published). The reserved
    /// entries are given back when the backend returns the head.
    pub fn add_raw_chain(&mut self, descs: &[RawDescriptor]) -> Result<u16, VringError> {
        let chain = self.take_descriptors(descs.len())?;
        let result = (|| {
            for (i, d) in descs.iter().enumerate() {
                let next = match d.next {
                    Link::Index(n) => n,
                    Link::Pos(p) => *chain.get(p).ok_or(VringError::BadLink {
                        queue: self.index,
                        pos: p,
                        len: descs.len(),
                    })?,
                };
                self.write_desc(chain[i], d.addr, d.len, d.flags, next)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.untake(chain);
            return Err(e);
        }
        let head = chain[0];
        self.make_available(head, chain)?;
        Ok(head)
    }

    /// Puts `head` in the avail ring as is, with no chain behind it (it may be out of range or
    /// a free descriptor). It counts as in flight; a used entry for it is reported as bogus.
    pub fn add_raw_head(&mut self, head: u16) -> Result<(), VringError> {
        self.mem.store_u16(
            self.layout.avail_ring(self.next_avail),
            head,
            Ordering::Relaxed,
        )?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.in_flight += 1;
        Ok(())
    }

    /// Publishes every chain added so far (release store of the avail index).
    pub fn publish(&mut self) -> Result<(), VringError> {
        self.mem
            .store_u16(self.layout.avail + 2, self.next_avail, Ordering::Release)?;
        Ok(())
    }

    /// Kicks the backend if it asked for it (`avail_event` with EVENT_IDX, otherwise the used
    /// ring's NO_NOTIFY flag). Returns whether it kicked.
    pub fn notify(&mut self) -> Result<bool, VringError> {
        fence(Ordering::SeqCst);
        let new = self.next_avail;
        let old = self.last_kick_avail;
        self.last_kick_avail = new;
        let needed = if self.event_idx {
            let event = self
                .mem
                .load_u16(self.layout.avail_event(), Ordering::Relaxed)?;
            need_event(event, new, old)
        } else {
            let flags = self.mem.load_u16(self.layout.used, Ordering::Relaxed)?;
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if needed {
            self.kick()?;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(needed)
    }

    /// Kicks unconditionally.
    pub fn kick(&mut self) -> Result<(), VringError> {
        self.stats.kicks += 1;
        self.kick.write(1).map_err(|source| VringError::Kick {
            queue: self.index,
            source,
        })
    }

    /// Takes the next used entry, if any, and frees its chain's descriptors.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, VringError> {
        let used = self.mem.load_u16(self.layout.used + 2, Ordering::Acquire)?;
        if used == self.last_used {
            return Ok(None);
        }
        if used.wrapping_sub(self.last_used) > self.in_flight {
            return Err(VringError::BogusUsedIdx {
                queue: self.index,
                used,
                last_used: self.last_used,
                in_flight: self.in_flight,
            });
        }
        let mut raw = [0u8; 8];
        self.mem
            .read(self.layout.used_ring(self.last_used), &mut raw)?;
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        // The entry is consumed either way, so a bogus one is reported once and the queue
        // stays usable (its in-flight count included: it was a raw head or a backend bug).
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight -= 1;
        let chain = usize::try_from(id)
            .ok()
            .and_then(|i| self.chains.get_mut(i))
            .filter(|c| !c.is_empty())
            .ok_or(VringError::BogusUsedId {
                queue: self.index,
                id,
            })?;
        self.free.append(chain);
        // `id` indexed `chains`, whose length is the queue size (≤ 32768): it fits in u16.
        Ok(Some(UsedElem {
            head: id as u16,
            len,
        }))
    }

    /// Asks for a call on the next used entry and says whether one is already there (then the
    /// caller must not sleep).
    pub fn enable_call(&mut self) -> Result<bool, VringError> {
        if self.event_idx {
            self.mem
                .store_u16(self.layout.used_event(), self.last_used, Ordering::Relaxed)?;
        } else {
            self.mem
                .store_u16(self.layout.avail, 0, Ordering::Relaxed)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.used_idx()? != self.last_used)
    }

    /// Asks the backend not to call (while the driver polls the used ring).
    pub fn suppress_call(&mut self) -> Result<(), VringError> {
        if self.event_idx {
            // With used_event one behind what we have consumed, the backend's
            // vring_need_event(event, new, old) stays false until the index wraps around.
            self.mem.store_u16(
                self.layout.used_event(),
                self.last_used.wrapping_sub(1),
                Ordering::Relaxed,
            )?;
        } else {
            self.mem.store_u16(
                self.layout.avail,
                VRING_AVAIL_F_NO_INTERRUPT as u16,
                Ordering::Relaxed,
            )?;
        }
        Ok(())
    }

    /// Sleeps until the call eventfd fires or `deadline` passes; consumes the eventfd count.
    pub fn wait_call(&mut self, deadline: Instant) -> Result<(), VringError> {
        self.stats.call_waits += 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error());
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            // SAFETY: the call eventfd is owned by `self` and stays open for this borrow.
            let fd = unsafe { BorrowedFd::borrow_raw(self.call.as_raw_fd()) };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => continue,
                Ok(_) => {
                    // EAGAIN: someone else drained it between poll and read; harmless.
                    let _ = self.call.read();
                    return Ok(());
                }
                Err(nix::Error::EINTR) => continue,
                Err(source) => {
                    return Err(VringError::Call {
                        queue: self.index,
                        source,
                    })
                }
            }
        }
    }

    /// Drains a pending call without waiting (e.g. before a reconnect).
    pub fn clear_call(&self) {
        let _ = self.call.read();
    }

    pub fn timeout_error(&self) -> VringError {
        VringError::Timeout {
            queue: self.index,
            in_flight: self.in_flight,
            avail: self.next_avail,
            used: self.used_idx().unwrap_or(u16::MAX),
            last_used: self.last_used,
        }
    }

    /// The raw fd numbers, for diagnostics.
    pub fn fds(&self) -> (i32, i32) {
        (self.kick.as_raw_fd(), self.call.as_raw_fd())
    }
}

impl Drop for SplitQueue {
    fn drop(&mut self) {
        // The area was allocated by `new` and is freed only here.
        let _ = self.mem.free(self.area);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_round_trip_through_a_fake_device() {
        let mem = FrontendMemory::new(1 << 20).unwrap();
        let mut q = SplitQueue::new(&mem, 0, 8).unwrap();
        let buf = mem.alloc(64, 8).unwrap();
        let segs = [
            Segment::readable(buf.slice(0, 16)),
            Segment::writable(buf.slice(16, 1)),
        ];
        let head = q.add_chain(&segs).unwrap();
        q.publish().unwrap();
        assert_eq!(q.avail_idx().unwrap(), 1);
        assert_eq!(q.free_descriptors(), 6);
        // Play the device: put the head into the used ring and bump the index.
        let l = q.layout();
        mem.write(l.used + 4, &u32::from(head).to_le_bytes())
            .unwrap();
        mem.write(l.used + 8, &1u32.to_le_bytes()).unwrap();
        mem.store_u16(l.used + 2, 1, Ordering::Release).unwrap();
        assert_eq!(q.pop_used().unwrap(), Some(UsedElem { head, len: 1 }));
        assert_eq!(q.pop_used().unwrap(), None);
        assert_eq!(q.free_descriptors(), 8);
        assert!(q.add_chain(&[segs[0]; 9]).is_err());
    }
}
