//! virtio-blk wire formats: the device config space, request header, status byte, discard /
//! write-zeroes segments, and requests as chains of segments in frontend memory.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

use crate::vhost::memory::GuestBuf;
use crate::vhost::vring::Segment;

pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// The config space up to `write_zeroes_may_unmap` and its padding (virtio 1.1): every
/// backend answers this much; later fields (secure erase, zoned) are newer than some backends.
pub const CONFIG_SIZE: u32 = 60;
pub const HEADER_SIZE: u64 = 16;
/// One discard / write-zeroes segment: sector (u64), num_sectors (u32), flags (u32).
pub const RANGE_SIZE: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("virtio-blk config space is {got} bytes, {want} needed")]
    ShortConfig { got: usize, want: usize },
}

/// The virtio-blk config space fields up to `write_zeroes_may_unmap` (little-endian on the
/// wire). Which fields are meaningful depends on the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub wce: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    pub fn parse(raw: &[u8]) -> Result<Self, RequestError> {
        if raw.len() < CONFIG_SIZE as usize {
            return Err(RequestError::ShortConfig {
                got: raw.len(),
                want: CONFIG_SIZE as usize,
            });
        }
        // The length was checked above: every fixed-size slice below is in bounds.
        let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Ok(BlkConfig {
            capacity: u64_at(0),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            cylinders: u16_at(16),
            heads: raw[18],
            sectors: raw[19],
            blk_size: u32_at(20),
            physical_block_exp: raw[24],
            alignment_offset: raw[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            wce: raw[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: raw[56],
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }
}

/// The status byte the device writes last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkStatus {
    Ok,
    IoErr,
    Unsupp,
    /// Anything else; `0xff` is what the frontend put there, so it means "not written".
    Other(u8),
}

/// What the frontend writes into the status byte before submitting.
pub const STATUS_UNWRITTEN: u8 = 0xff;

impl From<u8> for BlkStatus {
    fn from(b: u8) -> Self {
        match u32::from(b) {
            VIRTIO_BLK_S_OK => BlkStatus::Ok,
            VIRTIO_BLK_S_IOERR => BlkStatus::IoErr,
            VIRTIO_BLK_S_UNSUPP => BlkStatus::Unsupp,
            _ => BlkStatus::Other(b),
        }
    }
}

/// The request header: type, ioprio, sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkHeader {
    pub request_type: u32,
    pub ioprio: u32,
    pub sector: u64,
}

impl BlkHeader {
    pub fn encode(&self) -> [u8; HEADER_SIZE as usize] {
        let mut raw = [0u8; HEADER_SIZE as usize];
        raw[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        raw[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        raw[8..16].copy_from_slice(&self.sector.to_le_bytes());
        raw
    }
}

/// One discard / write-zeroes range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkRange {
    pub sector: u64,
    pub num_sectors: u32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP for write-zeroes; must be 0 for discard.
    pub flags: u32,
}

impl BlkRange {
    pub fn encode_all(ranges: &[BlkRange]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ranges.len() * RANGE_SIZE as usize);
        for r in ranges {
            out.extend_from_slice(&r.sector.to_le_bytes());
            out.extend_from_slice(&r.num_sectors.to_le_bytes());
            out.extend_from_slice(&r.flags.to_le_bytes());
        }
        out
    }
}

/// A request: header fields plus the data segments between header and status, in chain order.
/// The header and status descriptors come from the queue's request slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    pub header: BlkHeader,
    pub data: Vec<Segment>,
    /// Handed back in the completion.
    pub tag: u64,
}

impl BlkRequest {
    pub fn new(request_type: u32, sector: u64, data: Vec<Segment>) -> Self {
        BlkRequest {
            header: BlkHeader {
                request_type,
                ioprio: 0,
                sector,
            },
            data,
            tag: 0,
        }
    }

    /// VIRTIO_BLK_T_IN into `bufs` (one device-writable descriptor each).
    pub fn read(sector: u64, bufs: &[GuestBuf]) -> Self {
        Self::new(
            VIRTIO_BLK_T_IN,
            sector,
            bufs.iter().copied().map(Segment::writable).collect(),
        )
    }

    /// VIRTIO_BLK_T_OUT from `bufs` (one device-readable descriptor each).
    pub fn write(sector: u64, bufs: &[GuestBuf]) -> Self {
        Self::new(
            VIRTIO_BLK_T_OUT,
            sector,
            bufs.iter().copied().map(Segment::readable).collect(),
        )
    }

    pub fn flush() -> Self {
        Self::new(VIRTIO_BLK_T_FLUSH, 0, Vec::new())
    }

    /// VIRTIO_BLK_T_GET_ID into `buf` (20 bytes).
    pub fn get_id(buf: GuestBuf) -> Self {
        Self::new(VIRTIO_BLK_T_GET_ID, 0, vec![Segment::writable(buf)])
    }

    /// VIRTIO_BLK_T_DISCARD with the ranges encoded (by [`BlkRange::encode_all`]) in `ranges`.
    pub fn discard(ranges: GuestBuf) -> Self {
        Self::new(VIRTIO_BLK_T_DISCARD, 0, vec![Segment::readable(ranges)])
    }

    /// VIRTIO_BLK_T_WRITE_ZEROES with the ranges encoded in `ranges`.
    pub fn write_zeroes(ranges: GuestBuf) -> Self {
        Self::new(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            vec![Segment::readable(ranges)],
        )
    }

    pub fn with_tag(mut self, tag: u64) -> Self {
        self.tag = tag;
        self
    }

    pub fn with_ioprio(mut self, ioprio: u32) -> Self {
        self.header.ioprio = ioprio;
        self
    }
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkCompletion {
    pub tag: u64,
    pub head: u16,
    pub status: BlkStatus,
    /// What the backend put in the used entry: bytes it wrote into the chain.
    pub used_len: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_little_endian() {
        let mut raw = vec![0u8; CONFIG_SIZE as usize];
        raw[0..8].copy_from_slice(&(2048u64).to_le_bytes());
        raw[12..16].copy_from_slice(&126u32.to_le_bytes());
        raw[20..24].copy_from_slice(&512u32.to_le_bytes());
        raw[34..36].copy_from_slice(&2u16.to_le_bytes());
        let c = BlkConfig::parse(&raw).unwrap();
        assert_eq!(c.capacity_bytes(), 1 << 20);
        assert_eq!((c.seg_max, c.blk_size, c.num_queues), (126, 512, 2));
        assert!(BlkConfig::parse(&raw[..59]).is_err());
    }

    #[test]
    fn status_bytes() {
        assert_eq!(BlkStatus::from(0), BlkStatus::Ok);
        assert_eq!(BlkStatus::from(1), BlkStatus::IoErr);
        assert_eq!(BlkStatus::from(2), BlkStatus::Unsupp);
        assert_eq!(BlkStatus::from(0xff), BlkStatus::Other(0xff));
    }
}
