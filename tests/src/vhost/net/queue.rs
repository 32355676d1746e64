//! The two queues of a virtio-net queue pair, driven as a guest driver drives them:
//! [`RxQueue`] keeps receive buffers posted and reassembles frames (several buffers per frame
//! with MRG_RXBUF, told by `num_buffers`); [`TxQueue`] sends header + frame chains and takes
//! back the buffers the device has used.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::vhost::memory::{FrontendMemory, MemoryError, OwnedBuf};
use crate::vhost::vring::{RawDescriptor, Segment, SplitQueue, UsedElem, VringError};

use super::header::{NetHeader, HDR_LEN};

#[derive(Debug, thiserror::Error)]
pub enum NetQueueError {
    #[error(transparent)]
    Vring(#[from] VringError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("queue {queue}: the device used buffer {head}, which is not one of ours")]
    UnknownBuffer { queue: u16, head: u16 },
    #[error("queue {queue}: a received frame of {len} bytes is shorter than the header")]
    Short { queue: u16, len: u32 },
    #[error("queue {queue}: num_buffers is {num} in a frame's header")]
    BadNumBuffers { queue: u16, num: u16 },
}

/// One received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFrame {
    pub header: NetHeader,
    /// The frame after the virtio-net header.
    pub data: Vec<u8>,
    /// How many buffers it took.
    pub buffers: u16,
}

/// Waits for the next used entry of `q` (polling, then sleeping on the call eventfd).
fn next_used(q: &mut SplitQueue, deadline: Instant) -> Result<UsedElem, VringError> {
    loop {
        if let Some(u) = q.pop_used()? {
            return Ok(u);
        }
        if q.enable_call()? {
            continue;
        }
        q.wait_call(deadline)?;
    }
}

#[derive(Debug)]
pub struct RxQueue {
    q: SplitQueue,
    mem: Arc<FrontendMemory>,
    buf_len: u64,
    /// Buffers posted, by head.
    posted: HashMap<u16, OwnedBuf>,
}

impl RxQueue {
    pub fn new(mem: &Arc<FrontendMemory>, index: u16, size: u16) -> Result<Self, NetQueueError> {
        Ok(RxQueue {
            q: SplitQueue::new(mem, index, size)?,
            mem: Arc::clone(mem),
            buf_len: 0,
            posted: HashMap::new(),
        })
    }

    pub fn vring(&self) -> &SplitQueue {
        &self.q
    }

    pub fn vring_mut(&mut self) -> &mut SplitQueue {
        &mut self.q
    }

    /// Posts `count` buffers of `len` bytes each (one descriptor each) and kicks.
    pub fn post(&mut self, count: usize, len: u64) -> Result<(), NetQueueError> {
        self.buf_len = len;
        for _ in 0..count {
            let buf = self.mem.alloc_owned(len, 64)?;
            let head = self.q.add_chain(&[Segment::writable(buf.buf())])?;
            self.posted.insert(head, buf);
        }
        self.q.publish()?;
        self.q.notify()?;
        Ok(())
    }

    /// Posts a chain exactly as given (for fault tests); it is not reposted when used.
    pub fn post_raw(&mut self, descs: &[RawDescriptor]) -> Result<u16, NetQueueError> {
        let head = self.q.add_raw_chain(descs)?;
        self.q.publish()?;
        self.q.notify()?;
        Ok(head)
    }

    pub fn posted(&self) -> usize {
        self.posted.len()
    }

    /// Takes one used buffer: (its bytes, used length), and posts it again.
    fn take(&mut self, u: UsedElem) -> Result<Option<Vec<u8>>, NetQueueError> {
        let Some(buf) = self.posted.remove(&u.head) else {
            // A raw chain from a fault test: nothing to read or repost.
            return Ok(None);
        };
        let len = u.len.min(buf.len() as u32) as usize;
        let mut bytes = buf.to_vec()?;
        bytes.truncate(len);
        let head = self.q.add_chain(&[Segment::writable(buf.buf())])?;
        self.posted.insert(head, buf);
        self.q.publish()?;
        self.q.notify()?;
        Ok(Some(bytes))
    }

    /// Receives the next frame (reposting its buffers), or fails at `deadline`. Used entries
    /// of raw chains and zero-length entries (frames the device dropped) are skipped.
    pub fn recv(&mut self, deadline: Instant) -> Result<RxFrame, NetQueueError> {
        let index = self.q.index();
        loop {
            let u = next_used(&mut self.q, deadline)?;
            let Some(first) = self.take(u)? else {
                continue;
            };
            if first.is_empty() {
                continue;
            }
            if first.len() < HDR_LEN {
                return Err(NetQueueError::Short {
                    queue: index,
                    len: u.len,
                });
            }
            let header = NetHeader::parse(&first).unwrap_or_default();
            if header.num_buffers == 0 {
                return Err(NetQueueError::BadNumBuffers {
                    queue: index,
                    num: 0,
                });
            }
            let mut data = first[HDR_LEN..].to_vec();
            for _ in 1..header.num_buffers {
                let u = next_used(&mut self.q, deadline)?;
                let more = self.take(u)?.ok_or(NetQueueError::UnknownBuffer {
                    queue: index,
                    head: u.head,
                })?;
                data.extend_from_slice(&more);
            }
            return Ok(RxFrame {
                header,
                data,
                buffers: header.num_buffers,
            });
        }
    }

    /// Like [`Self::recv`], but returns `None` at once when no used entry is there now.
    pub fn try_recv(&mut self, deadline: Instant) -> Result<Option<RxFrame>, NetQueueError> {
        if self.q.used_idx()? == self.q.last_used() {
            return Ok(None);
        }
        self.recv(deadline).map(Some)
    }

    /// Takes used entries until one of chain `head` shows up; returns its used length.
    pub fn wait_raw(&mut self, head: u16, deadline: Instant) -> Result<u32, NetQueueError> {
        loop {
            let u = next_used(&mut self.q, deadline)?;
            let raw = u.head == head;
            self.take(u)?;
            if raw {
                return Ok(u.len);
            }
        }
    }
}

#[derive(Debug)]
pub struct TxQueue {
    q: SplitQueue,
    mem: Arc<FrontendMemory>,
    in_flight: HashMap<u16, Option<OwnedBuf>>,
}

impl TxQueue {
    pub fn new(mem: &Arc<FrontendMemory>, index: u16, size: u16) -> Result<Self, NetQueueError> {
        Ok(TxQueue {
            q: SplitQueue::new(mem, index, size)?,
            mem: Arc::clone(mem),
            in_flight: HashMap::new(),
        })
    }

    pub fn vring(&self) -> &SplitQueue {
        &self.q
    }

    pub fn vring_mut(&mut self) -> &mut SplitQueue {
        &mut self.q
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Queues header + frame split into descriptors of at most `piece` bytes (the header
    /// always in the first), publishes and kicks; returns the head.
    pub fn send_split(
        &mut self,
        header: &NetHeader,
        frame: &[u8],
        piece: usize,
    ) -> Result<u16, NetQueueError> {
        let total = HDR_LEN + frame.len();
        let buf = self.mem.alloc_owned(total as u64, 64)?;
        buf.write(0, &header.to_bytes())?;
        buf.write(HDR_LEN as u64, frame)?;
        let piece = piece.max(1) as u64;
        let mut segs = Vec::new();
        let mut at = 0u64;
        while at < total as u64 {
            let n = piece.min(total as u64 - at);
            segs.push(Segment::readable(buf.buf().slice(at, n)));
            at += n;
        }
        let head = self.q.add_chain(&segs)?;
        self.in_flight.insert(head, Some(buf));
        self.q.publish()?;
        self.q.notify()?;
        Ok(head)
    }

    /// Queues header + frame in one descriptor, publishes and kicks.
    pub fn send(&mut self, header: &NetHeader, frame: &[u8]) -> Result<u16, NetQueueError> {
        self.send_split(header, frame, usize::MAX)
    }

    /// Queues a chain exactly as given (for fault tests), publishes and kicks.
    pub fn send_raw(&mut self, descs: &[RawDescriptor]) -> Result<u16, NetQueueError> {
        let head = self.q.add_raw_chain(descs)?;
        self.in_flight.insert(head, None);
        self.q.publish()?;
        self.q.notify()?;
        Ok(head)
    }

    /// Waits until every chain sent so far is used.
    pub fn wait_all(&mut self, deadline: Instant) -> Result<(), NetQueueError> {
        while !self.in_flight.is_empty() {
            let u = next_used(&mut self.q, deadline)?;
            if self.in_flight.remove(&u.head).is_none() {
                return Err(NetQueueError::UnknownBuffer {
                    queue: self.q.index(),
                    head: u.head,
                });
            }
        }
        Ok(())
    }
}
