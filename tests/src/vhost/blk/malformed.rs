//! Deliberately malformed virtio-blk chains, for fault tests of backends: each case is a chain
//! a buggy or hostile driver could make. A correct backend fails the request (IOERR/UNSUPP, or
//! returns the chain with nothing written), logs, and keeps serving.
//!
//! The cases are written with [`BlkQueue::enqueue_raw`], so the descriptors are exactly as
//! listed here; the caller commits (and usually waits with a short deadline: a backend may
//! also drop the chain without completing it, which is legal for some cases).

use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use crate::vhost::memory::{MemoryError, OwnedBuf};
use crate::vhost::vring::{Link, RawDescriptor};

use super::queue::{BlkQueue, QueueError, RequestSlot};
use super::request::BlkHeader;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// Data length of the cases' I/O.
pub const DATA_LEN: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MalformedError {
    #[error("buffer for a malformed chain: {0}")]
    Memory(#[from] MemoryError),
    #[error("queueing a malformed chain: {0}")]
    Queue(#[from] QueueError),
}

/// The malformed chains on offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A read whose data descriptor starts past the end of guest memory.
    DataOutsideMemory,
    /// A read whose data descriptor starts inside memory and runs past its end.
    DataStraddlingEnd,
    /// A read whose data descriptor's address + length overflows 64 bits.
    DataAddressOverflow,
    /// The header descriptor points outside guest memory.
    HeaderOutsideMemory,
    /// The last descriptor links back to the head (NEXT set): an endless chain.
    Loop,
    /// A descriptor's `next` is past the end of the descriptor table.
    NextOutOfRange,
    /// A chain using every descriptor of the queue (data split into 1-sector pieces): longer
    /// than any sane `seg_max`. Needs an empty queue.
    TooLong,
    /// A read (IN) whose data descriptor is device-readable.
    ReadIntoReadOnly,
    /// A write (OUT) whose data descriptor is device-writable.
    WriteFromWritable,
    /// The header descriptor is device-writable.
    HeaderWritable,
    /// The status descriptor is device-readable.
    StatusReadOnly,
    /// No status descriptor: the chain ends with the data.
    MissingStatus,
    /// The header descriptor is 8 bytes, half a header.
    ShortHeader,
    /// A read with a zero-length data descriptor.
    ZeroLengthData,
    /// A descriptor with VRING_DESC_F_INDIRECT, which this frontend never negotiates.
    UnnegotiatedIndirect,
}

impl Malformed {
    pub const ALL: [Malformed; 15] = [
        Malformed::DataOutsideMemory,
        Malformed::DataStraddlingEnd,
        Malformed::DataAddressOverflow,
        Malformed::HeaderOutsideMemory,
        Malformed::Loop,
        Malformed::NextOutOfRange,
        Malformed::TooLong,
        Malformed::ReadIntoReadOnly,
        Malformed::WriteFromWritable,
        Malformed::HeaderWritable,
        Malformed::StatusReadOnly,
        Malformed::MissingStatus,
        Malformed::ShortHeader,
        Malformed::ZeroLengthData,
        Malformed::UnnegotiatedIndirect,
    ];
}

/// A queued malformed chain; `data` must outlive the request (drop it after completion).
#[derive(Debug)]
pub struct MalformedRequest {
    pub kind: Malformed,
    pub head: u16,
    pub data: OwnedBuf,
}

fn desc(addr: u64, len: u32, flags: u16, next: Link) -> RawDescriptor {
    RawDescriptor {
        addr,
        len,
        flags,
        next,
    }
}

/// Header (readable) → data (`data_flags`) → status (writable), linked by position.
fn three(s: RequestSlot, data_addr: u64, data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
    vec![
        desc(s.header.gpa, s.header.len as u32, NEXT, Link::Pos(1)),
        desc(data_addr, data_len, data_flags | NEXT, Link::Pos(2)),
        desc(s.status.gpa, 1, WRITE, Link::Index(0)),
    ]
}

/// Makes the `kind` chain at `sector` available on `q` (unpublished: call `q.commit()`).
pub fn enqueue_malformed(
    q: &mut BlkQueue,
    kind: Malformed,
    sector: u64,
    tag: u64,
) -> Result<MalformedRequest, MalformedError> {
    let mem = Arc::clone(q.memory());
    let data = mem.alloc_owned(u64::from(DATA_LEN), 4096)?;
    let (d, end) = (data.gpa(), mem.guest_end());
    let size = q.vring().size();
    let request_type = match kind {
        Malformed::WriteFromWritable => VIRTIO_BLK_T_OUT,
        _ => VIRTIO_BLK_T_IN,
    };
    let header = BlkHeader {
        request_type,
        ioprio: 0,
        sector,
    };
    let head = q.enqueue_raw(Some(&header), tag, |s| match kind {
        Malformed::DataOutsideMemory => three(s, end + 0x10_0000, DATA_LEN, WRITE),
        Malformed::DataStraddlingEnd => three(s, end - 512, DATA_LEN, WRITE),
        Malformed::DataAddressOverflow => three(s, u64::MAX - 1024, DATA_LEN, WRITE),
        Malformed::HeaderOutsideMemory => {
            let mut v = three(s, d, DATA_LEN, WRITE);
            v[0].addr = end + 0x1000;
            v
        }
        Malformed::Loop => {
            let mut v = three(s, d, DATA_LEN, WRITE);
            v[2] = desc(s.status.gpa, 1, WRITE | NEXT, Link::Pos(0));
            v
        }
        Malformed::NextOutOfRange => {
            let mut v = three(s, d, DATA_LEN, WRITE);
            v[1].next = Link::Index(size);
            v
        }
        Malformed::TooLong => {
            let pieces = usize::from(size).saturating_sub(2).max(1);
            let mut v = vec![desc(s.header.gpa, 16, NEXT, Link::Pos(1))];
            for i in 0..pieces {
                let off = (i as u64 * 512) % u64::from(DATA_LEN);
                v.push(desc(d + off, 512, WRITE | NEXT, Link::Pos(i + 2)));
            }
            v.push(desc(s.status.gpa, 1, WRITE, Link::Index(0)));
            v
        }
        Malformed::ReadIntoReadOnly => three(s, d, DATA_LEN, 0),
        Malformed::WriteFromWritable => three(s, d, DATA_LEN, WRITE),
        Malformed::HeaderWritable => {
            let mut v = three(s, d, DATA_LEN, WRITE);
            v[0].flags |= WRITE;
            v
        }
        Malformed::StatusReadOnly => {
            let mut v = three(s, d, DATA_LEN, WRITE);
            v[2].flags = 0;
            v
        }
        Malformed::MissingStatus => vec![
            desc(s.header.gpa, 16, NEXT, Link::Pos(1)),
            desc(d, DATA_LEN, WRITE, Link::Index(0)),
        ],
        Malformed::ShortHeader => {
            let mut v = three(s, d, DATA_LEN, WRITE);
            v[0].len = 8;
            v
        }
        Malformed::ZeroLengthData => three(s, d, 0, WRITE),
        Malformed::UnnegotiatedIndirect => {
            let mut v = three(s, d, DATA_LEN, WRITE);
            v[1].flags |= INDIRECT;
            v
        }
    })?;
    Ok(MalformedRequest { kind, head, data })
}

/// Puts descriptor index `head` in the avail ring with no chain behind it (pass the queue
/// size or more for an out-of-range head). Publish with `q.commit()`.
pub fn enqueue_bogus_head(q: &mut BlkQueue, head: u16) -> Result<(), MalformedError> {
    q.vring_mut()
        .add_raw_head(head)
        .map_err(|e| MalformedError::Queue(e.into()))
}
