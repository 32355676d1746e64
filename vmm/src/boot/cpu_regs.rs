//! The boot vCPU's initial state: GDT, identity page tables, segment and control registers.
//!
//! For the 64-bit Linux protocol the vCPU starts in long mode with the first GiB identity
//! mapped by 2 MiB pages; for PVH it starts in flat 32-bit protected mode with paging off.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::linux::ZERO_PAGE_START;
use super::pvh::START_INFO_START;
use super::{BootError, EntryPoint};

const GDT_START: u64 = 0x500;
const IDT_START: u64 = 0x520;
const BOOT_STACK_POINTER: u64 = 0x8ff0;
const PML4_START: u64 = 0x9000;
const PDPTE_START: u64 = 0xa000;
const PDE_START: u64 = 0xb000;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT descriptor from its flags (access byte + flags nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
}

/// The KVM view of the descriptor at `index` in the GDT.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let granular = (entry >> 55) & 1 == 1;
    let raw_limit = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn boot_gdt(entry: EntryPoint) -> [u64; 4] {
    match entry {
        EntryPoint::RealMode { .. } => [0; 4],
        EntryPoint::Linux64 { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        EntryPoint::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x008b, 0, 0x67),    // TSS
        ],
    }
}

/// Writes the GDT/IDT (and for long mode the page tables) and fills in `sregs`.
pub fn setup_sregs(
    memory: &GuestMemoryMmap,
    entry: EntryPoint,
    sregs: &mut kvm_sregs,
) -> Result<(), BootError> {
    if let EntryPoint::RealMode { .. } = entry {
        // KVM's reset state is real mode; only move CS from the reset vector's segment
        // (base 0xffff0000) to segment 0.
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        return Ok(());
    }
    let gdt = boot_gdt(entry);
    for (index, descriptor) in gdt.iter().enumerate() {
        memory
            .write_obj(*descriptor, GuestAddress(GDT_START + index as u64 * 8))
            .map_err(BootError::WriteTables)?;
    }
    memory
        .write_obj(0u64, GuestAddress(IDT_START))
        .map_err(BootError::WriteTables)?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match entry {
        EntryPoint::Linux64 { .. } => {
            write_identity_page_tables(memory)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::RealMode { .. } => {}
    }
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel, zero page and cmdline.
fn write_identity_page_tables(memory: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    memory
        .write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))
        .map_err(BootError::WriteTables)?;
    memory
        .write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))
        .map_err(BootError::WriteTables)?;
    for index in 0..512u64 {
        memory
            .write_obj(
                (index << 21) | PRESENT_WRITABLE | HUGE_PAGE,
                GuestAddress(PDE_START + index * 8),
            )
            .map_err(BootError::WriteTables)?;
    }
    Ok(())
}

/// General-purpose registers at entry.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryPoint::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rbx: START_INFO_START,
            ..Default::default()
        },
        EntryPoint::RealMode { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            ..Default::default()
        },
    }
}

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_round_trips_through_segment() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.l, 1);
        assert_eq!(code.db, 0);
        assert_eq!(code.g, 1);
        assert_eq!(code.present, 1);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.base, 0);
        let data32 = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 2);
        assert_eq!(data32.base, 0x1234_5678);
        assert_eq!(data32.db, 1);
        assert_eq!(data32.type_, 0x3);
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!(tss.limit, 0x67);
        assert_eq!(tss.g, 0);
    }

    #[test]
    fn long_mode_state() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let entry = EntryPoint::Linux64 {
            entry: GuestAddress(0x100200),
        };
        let mut sregs = kvm_sregs::default();
        setup_sregs(&memory, entry, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.l, 1);
        let pde: u64 = memory.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
        let regs = boot_regs(entry);
        assert_eq!(regs.rip, 0x100200);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
    }

    #[test]
    fn pvh_state() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let entry = EntryPoint::Pvh {
            entry: GuestAddress(0x1000000),
        };
        let mut sregs = kvm_sregs::default();
        setup_sregs(&memory, entry, &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(boot_regs(entry).rbx, START_INFO_START);
    }
}
