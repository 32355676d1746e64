//! The PVH boot protocol's `hvm_start_info`, memory map and module list.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootError, InitrdPlacement, CMDLINE_START};
use crate::memory::E820Entry;

/// Where `hvm_start_info` goes; `rbx` points here at entry.
pub const START_INFO_START: u64 = 0x6000;
const MODLIST_START: u64 = 0x6040;
const MEMMAP_START: u64 = 0x7000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

pub fn write_start_info(
    memory: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    rsdp: GuestAddress,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|entry| hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { MODLIST_START } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(START_INFO_START));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP_START));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.address.0,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, memory)
        .map_err(|e| BootError::BootParams(e.to_string()))
}
