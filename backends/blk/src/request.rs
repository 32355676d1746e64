//! Parsing and validating one virtio-blk request from its descriptor chain.
//!
//! Everything here is guest input and is checked before any I/O: every buffer must lie in guest
//! memory, device-readable buffers must come before device-writable ones, the chain must end
//! (no loop, no chain longer than the queue), lengths and sectors must fit the disk. A request
//! that fails a check is answered with IOERR or UNSUPP (where the status byte can be found at
//! all); the queue keeps going.
//!
//! The layout is not assumed (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1): the chain is read
//! as a byte stream of device-readable bytes (16-byte header, then data) followed by
//! device-writable bytes (data, then the one status byte at the very end).

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::disk::{SECTOR_SHIFT, SECTOR_SIZE};
use crate::GuestMem;

/// `struct virtio_blk_outhdr`: type (le32), ioprio (le32), sector (le64).
pub const HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector (le64), num_sectors (le32), flags (le32).
pub const SEGMENT_LEN: usize = 16;

/// A guest-physical buffer, already checked to lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One range of a discard or write-zeroes request, checked against the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    /// Write zeroes only: the device may deallocate instead of writing zeroes.
    pub unmap: bool,
}

impl Segment {
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }

    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) << SECTOR_SHIFT
    }

    pub fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

/// What the request asks for. The data buffers of reads, writes and GET_ID are in the range list
/// the caller handed to [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at byte `offset` into the data ranges.
    Read {
        offset: u64,
        len: u32,
    },
    /// Write `len` bytes from the data ranges at byte `offset`.
    Write {
        offset: u64,
        len: u32,
    },
    Flush,
    /// Write the serial number into the data ranges (`len` bytes of room).
    GetId {
        len: u32,
    },
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Where the one status byte goes.
    pub status: GuestAddress,
}

/// The disk and the negotiated features, as far as request validation needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub readonly: bool,
    /// VIRTIO_BLK_F_DISCARD negotiated.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES negotiated.
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("empty descriptor chain")]
    EmptyChain,
    #[error(
        "descriptor chain does not end after {0} descriptors (longer than the queue, a loop, \
         or a bad next index or indirect table)"
    )]
    Unterminated(usize),
    #[error("descriptor {index} ({addr:#x}, {len} bytes) is outside guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
    #[error("descriptor {0} is device-readable but follows a device-writable one")]
    ReadableAfterWritable(usize),
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("request header is {0} bytes, needs {HEADER_LEN}")]
    ShortHeader(u64),
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("{kind} request carries {len} device-readable data bytes (wrong direction)")]
    DataNotWritable { kind: &'static str, len: u64 },
    #[error("{kind} request carries {len} device-writable data bytes (wrong direction)")]
    DataNotReadable { kind: &'static str, len: u64 },
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{sectors} are beyond the capacity of {capacity} sectors")]
    BeyondCapacity {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("{0} request on a read-only disk")]
    ReadOnly(&'static str),
    #[error("{0} request but the feature was not negotiated")]
    NotNegotiated(&'static str),
    #[error("{kind} segment table of {len} bytes is empty or not a multiple of {SEGMENT_LEN}")]
    BadSegmentTable { kind: &'static str, len: u64 },
    #[error("{kind} request has {count} segments, more than the {max} offered")]
    TooManySegments {
        kind: &'static str,
        count: u64,
        max: u32,
    },
    #[error("{kind} segment of {num_sectors} sectors exceeds the {max} offered")]
    SegmentTooLarge {
        kind: &'static str,
        num_sectors: u32,
        max: u32,
    },
    #[error("{kind} segment has unsupported flags {flags:#x}")]
    BadFlags { kind: &'static str, flags: u32 },
    #[error("GET_ID request without a device-writable buffer for the id")]
    NoIdBuffer,
    #[error("cannot read guest memory at {0:#x}")]
    GuestRead(u64),
}

impl RequestError {
    /// The virtio-blk status the guest gets for this failure.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnknownType(_)
            | RequestError::NotNegotiated(_)
            | RequestError::BadFlags { .. } => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A request that failed validation, with the status byte location if one could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

/// Device-readable and device-writable byte streams of a chain.
struct Split<'a> {
    readable: &'a [GuestRange],
    writable: &'a [GuestRange],
}

fn total(ranges: &[GuestRange]) -> u64 {
    ranges.iter().map(|r| u64::from(r.len)).sum()
}

/// Copies up to `out.len()` bytes from the start of `ranges`; returns how many were copied.
fn gather(mem: &GuestMem, ranges: &[GuestRange], out: &mut [u8]) -> Result<usize, RequestError> {
    let mut done = 0;
    for range in ranges {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(range.len as usize);
        mem.read_slice(&mut out[done..done + n], range.addr)
            .map_err(|_| RequestError::GuestRead(range.addr.0))?;
        done += n;
    }
    Ok(done)
}

/// Appends `ranges` to `out` without their first `skip` bytes.
fn skip_front(ranges: &[GuestRange], mut skip: u64, out: &mut Vec<GuestRange>) {
    for range in ranges {
        let len = u64::from(range.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // skip < len <= u32::MAX, so both fit.
        out.push(GuestRange {
            addr: GuestAddress(range.addr.0 + skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
}

/// Appends `ranges` to `out` without their last byte (the status).
fn drop_last_byte(ranges: &[GuestRange], out: &mut Vec<GuestRange>) {
    let Some((last, front)) = ranges.split_last() else {
        return;
    };
    out.extend_from_slice(front);
    // Ranges in the list are never empty (split() leaves zero-length descriptors out).
    if last.len > 1 {
        out.push(GuestRange {
            addr: last.addr,
            len: last.len - 1,
        });
    }
}

fn check_sectors(offset_sector: u64, bytes: u64, limits: &Limits) -> Result<(), RequestError> {
    if !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(bytes));
    }
    let sectors = bytes >> SECTOR_SHIFT;
    match offset_sector.checked_add(sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(RequestError::BeyondCapacity {
            sector: offset_sector,
            sectors,
            capacity: limits.capacity_sectors,
        }),
    }
}

/// Reads and checks the segment table of a discard or write-zeroes request.
fn parse_segments(
    mem: &GuestMem,
    table: &[GuestRange],
    discard: bool,
    limits: &Limits,
) -> Result<Vec<Segment>, RequestError> {
    let (kind, max_seg, max_sectors, allowed_flags) = if discard {
        (
            "discard",
            limits.max_discard_seg,
            limits.max_discard_sectors,
            0,
        )
    } else {
        (
            "write-zeroes",
            limits.max_write_zeroes_seg,
            limits.max_write_zeroes_sectors,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        )
    };
    let len = total(table);
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN as u64) {
        return Err(RequestError::BadSegmentTable { kind, len });
    }
    let count = len / SEGMENT_LEN as u64;
    if count > u64::from(max_seg) {
        return Err(RequestError::TooManySegments {
            kind,
            count,
            max: max_seg,
        });
    }
    // count <= max_seg, a small number we chose, so this allocation is bounded.
    let mut bytes = vec![0u8; len as usize];
    gather(mem, table, &mut bytes)?;
    let mut segments = Vec::with_capacity(count as usize);
    for raw in bytes.chunks_exact(SEGMENT_LEN) {
        let field = |range: std::ops::Range<usize>| {
            raw[range]
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        };
        let sector = field(0..8);
        // Four little-endian bytes always fit a u32.
        let num_sectors = field(8..12) as u32;
        let flags = field(12..16) as u32;
        if flags & !allowed_flags != 0 {
            return Err(RequestError::BadFlags { kind, flags });
        }
        if num_sectors > max_sectors {
            return Err(RequestError::SegmentTooLarge {
                kind,
                num_sectors,
                max: max_sectors,
            });
        }
        check_sectors(sector, u64::from(num_sectors) << SECTOR_SHIFT, limits)?;
        segments.push(Segment {
            sector,
            num_sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segments)
}

/// Where IOERR can go when the chain is malformed: the last byte of the last descriptor, if it
/// is device-writable and in guest memory (that is where a well-formed chain has its status).
fn fallback_status(descs: &[Descriptor], mem: &GuestMem) -> Option<GuestAddress> {
    let last = descs.last()?;
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    mem.check_range(addr, 1).then_some(addr)
}

/// Checks a chain's buffers and splits them into device-readable and device-writable ranges
/// (into `scratch`, readable first).
fn split<'a>(
    descs: &[Descriptor],
    mem: &GuestMem,
    scratch: &'a mut Vec<GuestRange>,
) -> Result<Split<'a>, RequestError> {
    let last = descs.last().ok_or(RequestError::EmptyChain)?;
    if last.has_next() {
        return Err(RequestError::Unterminated(descs.len()));
    }
    scratch.clear();
    let mut first_writable = None;
    for (index, desc) in descs.iter().enumerate() {
        if desc.len() == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(RequestError::OutsideMemory {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        if desc.is_write_only() {
            first_writable.get_or_insert(scratch.len());
        } else if first_writable.is_some() {
            return Err(RequestError::ReadableAfterWritable(index));
        }
        scratch.push(GuestRange {
            addr: desc.addr(),
            len: desc.len(),
        });
    }
    let (readable, writable) = scratch.split_at(first_writable.unwrap_or(scratch.len()));
    Ok(Split { readable, writable })
}

/// Parses one request. `descs` is the chain as the queue yielded it; `data` receives the data
/// ranges of reads, writes and GET_ID (cleared first); `scratch` is working room.
pub fn parse(
    descs: &[Descriptor],
    mem: &GuestMem,
    limits: &Limits,
    data: &mut Vec<GuestRange>,
    scratch: &mut Vec<GuestRange>,
) -> Result<Request, Rejected> {
    data.clear();
    let reject_early = |error| Rejected {
        error,
        status: fallback_status(descs, mem),
    };
    let parts = split(descs, mem, scratch).map_err(reject_early)?;
    // A well-formed chain ends with a device-writable descriptor whose last byte is the status.
    let status = parts
        .writable
        .last()
        .map(|r| GuestAddress(r.addr.0 + u64::from(r.len) - 1))
        .ok_or(Rejected {
            error: RequestError::NoStatus,
            status: None,
        })?;
    let reject = |error| Rejected {
        error,
        status: Some(status),
    };

    let mut header = [0u8; HEADER_LEN];
    let got = gather(mem, parts.readable, &mut header).map_err(reject)?;
    if got < HEADER_LEN {
        return Err(reject(RequestError::ShortHeader(got as u64)));
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let readable_data = total(parts.readable) - HEADER_LEN as u64;
    let writable_data = total(parts.writable) - 1;
    let kind = match request_type {
        VIRTIO_BLK_T_IN => "read",
        VIRTIO_BLK_T_OUT => "write",
        VIRTIO_BLK_T_FLUSH => "flush",
        VIRTIO_BLK_T_GET_ID => "get-id",
        VIRTIO_BLK_T_DISCARD => "discard",
        VIRTIO_BLK_T_WRITE_ZEROES => "write-zeroes",
        other => return Err(reject(RequestError::UnknownType(other))),
    };
    // The chain's total length is below 2^32 (the queue crate stops a chain there), so every
    // data length below fits a u32.
    let op = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => {
            if readable_data != 0 {
                return Err(reject(RequestError::DataNotWritable {
                    kind,
                    len: readable_data,
                }));
            }
            drop_last_byte(parts.writable, data);
            if request_type == VIRTIO_BLK_T_IN {
                check_sectors(sector, writable_data, limits).map_err(reject)?;
                Op::Read {
                    offset: sector << SECTOR_SHIFT,
                    len: writable_data as u32,
                }
            } else if writable_data == 0 {
                return Err(reject(RequestError::NoIdBuffer));
            } else {
                Op::GetId {
                    len: writable_data as u32,
                }
            }
        }
        VIRTIO_BLK_T_OUT => {
            if writable_data != 0 {
                return Err(reject(RequestError::DataNotReadable {
                    kind,
                    len: writable_data,
                }));
            }
            if limits.readonly {
                return Err(reject(RequestError::ReadOnly(kind)));
            }
            check_sectors(sector, readable_data, limits).map_err(reject)?;
            skip_front(parts.readable, HEADER_LEN as u64, data);
            Op::Write {
                offset: sector << SECTOR_SHIFT,
                len: readable_data as u32,
            }
        }
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        _ => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let negotiated = if discard {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !negotiated {
                return Err(reject(RequestError::NotNegotiated(kind)));
            }
            if limits.readonly {
                return Err(reject(RequestError::ReadOnly(kind)));
            }
            if writable_data != 0 {
                return Err(reject(RequestError::DataNotReadable {
                    kind,
                    len: writable_data,
                }));
            }
            let mut table = Vec::new();
            skip_front(parts.readable, HEADER_LEN as u64, &mut table);
            let segments = parse_segments(mem, &table, discard, limits).map_err(reject)?;
            if discard {
                Op::Discard(segments)
            } else {
                Op::WriteZeroes(segments)
            }
        }
    };
    Ok(Request { op, status })
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
