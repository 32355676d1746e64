//! The Linux x86 boot protocol's zero page (`struct boot_params`).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootError, InitrdPlacement, CMDLINE_START};
use crate::memory::E820Entry;

/// Where the zero page goes; `rsi` points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

pub fn write_zero_page(
    memory: &GuestMemoryMmap,
    image_header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
    rsdp: GuestAddress,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = image_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        // The initrd sits below 4 GiB (see load_initrd), so the 32-bit fields hold it.
        params.hdr.ramdisk_image = initrd.address.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    if e820.len() > params.e820_table.len() {
        return Err(BootError::BootParams(format!(
            "{} e820 entries do not fit the zero page's {}",
            e820.len(),
            params.e820_table.len()
        )));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        memory,
    )
    .map_err(|e| BootError::BootParams(e.to_string()))
}
