//! The backing image: a regular file or a block device, opened once and shared by every queue
//! of every session (positional I/O needs no lock).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The virtio-blk sector: capacities and request offsets count in these.
pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;
/// Logical block size offered with `--direct`: O_DIRECT needs offsets, lengths and buffers
/// aligned to the host's logical block, which may be 4096 on modern storage.
pub const DIRECT_BLOCK_SIZE: u32 = 4096;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("cannot open image {path}{mode}: {source}")]
    Open {
        path: PathBuf,
        mode: &'static str,
        source: io::Error,
    },
    #[error("cannot find the size of image {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("image {path} is {size} bytes, smaller than one {SECTOR_SIZE}-byte sector")]
    TooSmall { path: PathBuf, size: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    File,
    BlockDevice,
}

#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    kind: DiskKind,
    capacity_sectors: u64,
    readonly: bool,
    direct: bool,
    block_size: u32,
}

impl Disk {
    /// Opens the image read-write (or read-only), with O_DIRECT when asked.
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, DiskError> {
        let mut options = OpenOptions::new();
        options.read(true).write(!readonly);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mode = match (readonly, direct) {
            (true, true) => " read-only with O_DIRECT",
            (true, false) => " read-only",
            (false, true) => " read-write with O_DIRECT",
            (false, false) => " read-write",
        };
        let mut file = options.open(path).map_err(|source| DiskError::Open {
            path: path.to_owned(),
            mode,
            source,
        })?;
        let meta = file.metadata().map_err(|source| DiskError::Size {
            path: path.to_owned(),
            source,
        })?;
        let kind = if meta.file_type().is_block_device() {
            DiskKind::BlockDevice
        } else {
            DiskKind::File
        };
        // Seeking to the end works for files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_owned(),
                source,
            })?;
        let capacity_sectors = size >> SECTOR_SHIFT;
        if capacity_sectors == 0 {
            return Err(DiskError::TooSmall {
                path: path.to_owned(),
                size,
            });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "image {} is not a whole number of sectors; its last {} bytes are not visible",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Disk {
            file,
            path: path.to_owned(),
            kind,
            capacity_sectors,
            readonly,
            direct,
            block_size: if direct {
                DIRECT_BLOCK_SIZE
            } else {
                SECTOR_SIZE as u32
            },
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    /// Size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Logical block size offered to the guest (VIRTIO_BLK_F_BLK_SIZE).
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_and_sizes_an_image() {
        let path = std::env::temp_dir().join(format!("splitvmm-blk-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 3 * 512 + 100]).expect("write");
        let disk = Disk::open(&path, true, false).expect("open");
        assert_eq!(disk.capacity_sectors(), 3);
        assert_eq!(disk.kind(), DiskKind::File);
        assert_eq!(disk.block_size(), 512);
        assert!(disk.readonly());

        std::fs::write(&path, vec![0u8; 100]).expect("write");
        assert!(matches!(
            Disk::open(&path, false, false),
            Err(DiskError::TooSmall { size: 100, .. })
        ));
        std::fs::remove_file(&path).expect("cleanup");
        let err = Disk::open(&path, false, false).expect_err("missing");
        assert!(err.to_string().contains("read-write"), "{err}");
    }
}
