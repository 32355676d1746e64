//! Guest RAM and the guest-physical layout.
//!
//! RAM is always one memfd mapped `MAP_SHARED`: the vhost-user backends map the same file, so
//! the guest's buffers are visible to them without copies. Above [`LOW_RAM_END`] the 32-bit
//! PCI hole (MMIO, IOAPIC, LAPIC) is left out of RAM and the rest of RAM moves above 4 GiB.

use std::fs::File;

use nix::sys::memfd::{memfd_create, MFdFlags};
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::boot::acpi::{ACPI_TABLES_END, ACPI_TABLES_START};
use crate::pci::{PCI_ECAM_SIZE, PCI_ECAM_START};

/// End of RAM below 4 GiB; from here to 4 GiB is the 32-bit PCI/MMIO hole.
pub const LOW_RAM_END: u64 = 0xc000_0000;
/// Where RAM continues when it does not fit below [`LOW_RAM_END`].
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Start of the extended BIOS data area; the real-mode area below it is usable RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// The kernel and everything above the legacy 1 MiB area start here.
pub const HIMEM_START: u64 = 0x10_0000;

/// e820 entry types (Linux `arch/x86/include/uapi/asm/e820.h`).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest RAM memfd to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest RAM of {0} bytes does not fit in this host's address space")]
    TooLarge(u64),
}

/// One contiguous piece of guest RAM: where it sits in the guest and where in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub guest_start: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// The RAM regions for `memory_bytes` of guest RAM, skipping the 32-bit hole.
pub fn ram_regions(memory_bytes: u64) -> Vec<RamRegion> {
    let low = memory_bytes.min(LOW_RAM_END);
    let mut regions = vec![RamRegion {
        guest_start: 0,
        size: low,
        file_offset: 0,
    }];
    if memory_bytes > low {
        regions.push(RamRegion {
            guest_start: HIGH_RAM_START,
            size: memory_bytes - low,
            file_offset: low,
        });
    }
    regions
}

/// Guest RAM backed by one shared memfd.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub memfd: File,
    pub regions: Vec<RamRegion>,
}

impl GuestRam {
    pub fn new(memory_bytes: u64) -> Result<Self, MemoryError> {
        let memfd = create_memfd("splitvmm-guest-ram")?;
        memfd
            .set_len(memory_bytes)
            .map_err(|source| MemoryError::Resize {
                size: memory_bytes,
                source,
            })?;
        let regions = ram_regions(memory_bytes);
        let ranges = regions
            .iter()
            .map(|region| {
                let size = usize::try_from(region.size)
                    .map_err(|_| MemoryError::TooLarge(memory_bytes))?;
                let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
                Ok((
                    GuestAddress(region.guest_start),
                    size,
                    Some(FileOffset::new(file, region.file_offset)),
                ))
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let memory =
            GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|source| MemoryError::Map {
                size: memory_bytes,
                source,
            })?;
        Ok(GuestRam {
            memory,
            memfd,
            regions,
        })
    }

    /// The last guest address + 1 of RAM below 4 GiB, where the initrd goes at the latest.
    pub fn low_ram_end(&self) -> u64 {
        self.regions[0].size
    }
}

fn create_memfd(name: &str) -> Result<File, MemoryError> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)
        .map_err(|errno| MemoryError::Memfd(errno.into()))?;
    Ok(File::from(fd))
}

/// One e820 entry as the boot protocols want it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map: conventional memory below the EBDA, the BIOS area holding the ACPI tables
/// reserved, RAM from 1 MiB up to the hole, the PCI ECAM region reserved (Linux uses MMCONFIG
/// only when firmware reserves it), and RAM above 4 GiB when there is any.
pub fn e820_map(regions: &[RamRegion]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_TABLES_START,
            size: ACPI_TABLES_END - ACPI_TABLES_START,
            kind: E820_RESERVED,
        },
    ];
    for region in regions {
        let start = region.guest_start.max(HIMEM_START);
        let end = region.guest_start + region.size;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|entry| entry.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_guest_is_one_region() {
        let regions = ram_regions(512 << 20);
        assert_eq!(
            regions,
            vec![RamRegion {
                guest_start: 0,
                size: 512 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_guest_skips_the_pci_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].size, LOW_RAM_END);
        assert_eq!(regions[1].guest_start, HIGH_RAM_START);
        assert_eq!(regions[1].size, (4 << 30) - LOW_RAM_END);
        assert_eq!(regions[1].file_offset, LOW_RAM_END);
        let total: u64 = regions.iter().map(|r| r.size).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn e820_matches_ram_and_reserves_acpi() {
        let map = e820_map(&ram_regions(4 << 30));
        assert_eq!(map[0].addr, 0);
        assert_eq!(map[0].size, EBDA_START);
        assert_eq!(map[1].kind, E820_RESERVED);
        assert!(map[1].addr <= ACPI_TABLES_START && map[1].addr + map[1].size >= ACPI_TABLES_END);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, LOW_RAM_END);
        assert_eq!((map[3].addr, map[3].kind), (PCI_ECAM_START, E820_RESERVED));
        assert_eq!(map[4].addr, HIGH_RAM_START);
        assert_eq!(map[4].size, (4 << 30) - LOW_RAM_END);
        // Nothing in the 32-bit hole is RAM.
        for entry in map.iter().filter(|e| e.kind == E820_RAM) {
            let end = entry.addr + entry.size;
            assert!(end <= LOW_RAM_END || entry.addr >= HIGH_RAM_START);
        }
        // Entries are sorted and do not overlap.
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr);
        }
    }

    #[test]
    fn ram_is_a_shared_memfd() {
        let ram = GuestRam::new(256 << 20).unwrap();
        assert_eq!(ram.memfd.metadata().unwrap().len(), 256 << 20);
        ram.memory
            .write_obj(0x1234_5678u32, GuestAddress(0x1000))
            .unwrap();
        // A write through the guest mapping is visible through the file: the mapping is shared.
        let mut bytes = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&ram.memfd, &mut bytes, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(bytes), 0x1234_5678);
        assert_eq!(ram.memory.num_regions(), 1);
    }
}
