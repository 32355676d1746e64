//! The virtio-blk configuration space (`struct virtio_blk_config`), laid out by hand at the
//! spec's offsets, little-endian.

use crate::backend::DeviceSettings;
use crate::disk::SECTOR_SIZE;

/// Longest config space a frontend may read (VHOST_USER_MAX_CONFIG_SIZE); bytes past the fields
/// we fill read as zero.
pub const MAX_CONFIG_SIZE: u32 = 256;
/// Discard and write-zeroes limits offered to the guest (and enforced on its requests).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
pub const MAX_DISCARD_SEG: u32 = 32;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (1 << 22) - 1;
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;
/// Discard granularity in sectors: 4 KiB, the block size of the filesystems images live on.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Segments per request are bounded by the queue the frontend picks (QEMU: 128 by default);
/// two descriptors go to the header and the status.
const SEG_MAX_QUEUE: u16 = 128;

// Field offsets in struct virtio_blk_config (virtio 1.2, 5.2.4).
const CAPACITY: usize = 0;
const SEG_MAX: usize = 12;
const BLK_SIZE: usize = 20;
const NUM_QUEUES: usize = 34;
const MAX_DISCARD_SECTORS_AT: usize = 36;
const MAX_DISCARD_SEG_AT: usize = 40;
const DISCARD_SECTOR_ALIGNMENT_AT: usize = 44;
const MAX_WRITE_ZEROES_SECTORS_AT: usize = 48;
const MAX_WRITE_ZEROES_SEG_AT: usize = 52;
const WRITE_ZEROES_MAY_UNMAP: usize = 56;
/// End of the fields up to write_zeroes_may_unmap and its padding.
const FILLED: usize = 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; FILLED],
}

impl ConfigSpace {
    pub fn new(settings: &DeviceSettings) -> Self {
        let mut bytes = [0u8; FILLED];
        let mut put = |at: usize, value: &[u8]| bytes[at..at + value.len()].copy_from_slice(value);
        put(CAPACITY, &settings.disk.capacity_sectors().to_le_bytes());
        let seg_max = u32::from(settings.queue_size.min(SEG_MAX_QUEUE)) - 2;
        put(SEG_MAX, &seg_max.to_le_bytes());
        put(BLK_SIZE, &settings.disk.block_size().to_le_bytes());
        put(NUM_QUEUES, &settings.num_queues.to_le_bytes());
        let alignment =
            DISCARD_SECTOR_ALIGNMENT.max(settings.disk.block_size() / SECTOR_SIZE as u32);
        put(MAX_DISCARD_SECTORS_AT, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(MAX_DISCARD_SEG_AT, &MAX_DISCARD_SEG.to_le_bytes());
        put(DISCARD_SECTOR_ALIGNMENT_AT, &alignment.to_le_bytes());
        put(
            MAX_WRITE_ZEROES_SECTORS_AT,
            &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
        );
        put(MAX_WRITE_ZEROES_SEG_AT, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
        put(WRITE_ZEROES_MAY_UNMAP, &[1]);
        ConfigSpace { bytes }
    }

    /// `size` bytes from `offset`; empty (the crate then answers with an error) when the range
    /// runs past MAX_CONFIG_SIZE.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let end = match offset.checked_add(size) {
            Some(end) if end <= MAX_CONFIG_SIZE => end,
            _ => {
                log::warn!("config read of {size} bytes at offset {offset} is out of range");
                return Vec::new();
            }
        };
        // Both bounds are at most 256.
        (offset as usize..end as usize)
            .map(|i| self.bytes.get(i).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Disk;
    use std::mem::offset_of;
    use std::sync::Arc;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    #[test]
    fn offsets_match_the_kernel_header() {
        assert_eq!(offset_of!(virtio_blk_config, capacity), CAPACITY);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), SEG_MAX);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), BLK_SIZE);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), NUM_QUEUES);
        assert_eq!(
            offset_of!(virtio_blk_config, max_discard_sectors),
            MAX_DISCARD_SECTORS_AT
        );
        assert_eq!(
            offset_of!(virtio_blk_config, max_discard_seg),
            MAX_DISCARD_SEG_AT
        );
        assert_eq!(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            DISCARD_SECTOR_ALIGNMENT_AT
        );
        assert_eq!(
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            MAX_WRITE_ZEROES_SECTORS_AT
        );
        assert_eq!(
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            MAX_WRITE_ZEROES_SEG_AT
        );
        assert_eq!(
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            WRITE_ZEROES_MAY_UNMAP
        );
        assert_eq!(
            offset_of!(virtio_blk_config, max_secure_erase_sectors),
            FILLED
        );
    }

    #[test]
    fn fills_fields_and_bounds_reads() {
        let path = std::env::temp_dir().join(format!("splitvmm-blk-cfg-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("image");
        let disk = Disk::open(&path, false, false).expect("disk");
        std::fs::remove_file(&path).expect("cleanup");
        let settings = DeviceSettings {
            disk: Arc::new(disk),
            num_queues: 3,
            queue_size: 1024,
            serial: Arc::from(&b""[..]),
            engine: crate::io::EngineKind::Sync,
            poll: std::time::Duration::ZERO,
        };
        let config = ConfigSpace::new(&settings);
        let all = config.read(0, 60);
        assert_eq!(all.len(), 60);
        assert_eq!(u64::from_le_bytes(all[0..8].try_into().expect("8")), 2048);
        assert_eq!(u32::from_le_bytes(all[12..16].try_into().expect("4")), 126);
        assert_eq!(u32::from_le_bytes(all[20..24].try_into().expect("4")), 512);
        assert_eq!(u16::from_le_bytes(all[34..36].try_into().expect("2")), 3);
        assert_eq!(all[56], 1);
        // Partial reads, reads past the filled fields (zero), reads past the limit (refused).
        assert_eq!(config.read(34, 2), vec![3, 0]);
        assert_eq!(config.read(60, 12), vec![0; 12]);
        assert!(config.read(250, 7).is_empty());
        assert!(config.read(u32::MAX, 2).is_empty());
    }
}
