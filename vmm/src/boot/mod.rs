//! Loading the guest kernel, initrd and command line, and describing the machine to it.
//!
//! Two entry protocols: the Linux 64-bit boot protocol (bzImage, or an ELF vmlinux without a
//! PVH note) with a zero page, and PVH (an ELF vmlinux with a PVH note) with an
//! `hvm_start_info`. Either way the guest also gets ACPI tables (see [`acpi`]).

pub mod acpi;
pub mod cpu_regs;
mod linux;
mod pvh;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::config::{KernelFormat, VmConfig};
use crate::memory::{GuestRam, HIMEM_START};

/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x2_0000;
/// The x86 kernel's COMMAND_LINE_SIZE (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes: {0}")]
    Cmdline(String),
    #[error("cannot write the kernel command line into guest memory: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM below {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot load initrd {path}: {source}")]
    LoadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
    #[error("cannot build ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("real-mode code of {0} bytes does not fit below 64 KiB")]
    RealModeTooLarge(usize),
    #[error("cannot write boot page tables, GDT or code into guest memory: {0}")]
    WriteTables(vm_memory::GuestMemoryError),
}

/// How the boot vCPU must be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit long mode at `entry` with `rsi` = zero page.
    Linux64 { entry: GuestAddress },
    /// 32-bit protected mode, paging off, at `entry` with `rbx` = start_info.
    Pvh { entry: GuestAddress },
    /// Real mode with CS = 0 at `entry` (fast-lane test guests).
    RealMode { entry: GuestAddress },
}

/// Where [`load_real_mode`] puts code and starts the boot vCPU.
pub const REAL_MODE_LOAD_ADDRESS: u64 = 0x1000;
/// Real-mode code runs in the first segment: it must end below 64 KiB.
const REAL_MODE_MAX_CODE: usize = 0x1_0000 - REAL_MODE_LOAD_ADDRESS as usize;

/// Loads raw real-mode code; the boot vCPU starts at its first byte with CS = 0.
pub fn load_real_mode(ram: &GuestRam, code: &[u8]) -> Result<EntryPoint, BootError> {
    if code.len() > REAL_MODE_MAX_CODE {
        return Err(BootError::RealModeTooLarge(code.len()));
    }
    ram.memory
        .write_slice(code, GuestAddress(REAL_MODE_LOAD_ADDRESS))
        .map_err(BootError::WriteTables)?;
    Ok(EntryPoint::RealMode {
        entry: GuestAddress(REAL_MODE_LOAD_ADDRESS),
    })
}

/// Where the initrd landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub address: GuestAddress,
    pub size: u64,
}

/// Loads everything the guest needs into RAM and returns how to enter the kernel.
pub fn load_guest(config: &VmConfig, ram: &GuestRam) -> Result<EntryPoint, BootError> {
    let memory = &ram.memory;
    let mut kernel_file = open(&config.kernel)?;
    let load_error = |source| BootError::LoadKernel {
        path: config.kernel.clone(),
        source,
    };
    let (entry, setup_header) = match config.kernel_format {
        KernelFormat::BzImage => {
            let loaded = BzImage::load(
                memory,
                None,
                &mut kernel_file,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(load_error)?;
            let entry = GuestAddress(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET);
            (EntryPoint::Linux64 { entry }, loaded.setup_header)
        }
        KernelFormat::Elf => {
            let loaded = Elf::load(
                memory,
                None,
                &mut kernel_file,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(load_error)?;
            match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => (EntryPoint::Pvh { entry }, None),
                _ => (
                    EntryPoint::Linux64 {
                        entry: loaded.kernel_load,
                    },
                    None,
                ),
            }
        }
    };

    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&config.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(memory, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::WriteCmdline)?;
    let cmdline_size = config.cmdline.len() + 1;

    let initrd_limit = setup_header
        .map(|hdr| u64::from(hdr.initrd_addr_max) + 1)
        .unwrap_or(u64::MAX)
        .min(ram.low_ram_end());
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(ram, path, initrd_limit)?),
        None => None,
    };

    match entry {
        EntryPoint::Linux64 { entry } => {
            log::info!(
                "entering the kernel through the 64-bit boot protocol at {:#x}",
                entry.0
            )
        }
        EntryPoint::Pvh { entry } => {
            log::info!("entering the kernel through PVH at {:#x}", entry.0)
        }
        EntryPoint::RealMode { .. } => {}
    }
    let rsdp = acpi::create_acpi_tables(
        memory,
        &acpi::AcpiConfig {
            num_vcpus: config.vcpus,
        },
    )?;
    let e820 = crate::memory::e820_map(&ram.regions);
    match entry {
        EntryPoint::Linux64 { .. } => {
            linux::write_zero_page(memory, setup_header, cmdline_size, initrd, rsdp, &e820)?
        }
        EntryPoint::Pvh { .. } => pvh::write_start_info(memory, initrd, rsdp, &e820)?,
        EntryPoint::RealMode { .. } => {}
    }
    Ok(entry)
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Puts the initrd as high as possible below `limit`, page aligned, as boot loaders do.
fn load_initrd(ram: &GuestRam, path: &Path, limit: u64) -> Result<InitrdPlacement, BootError> {
    let contents = std::fs::read(path).map_err(|source| BootError::LoadInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    let size = contents.len() as u64;
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    // The kernel is loaded at 1 MiB and decompresses above it; keep the initrd well clear of
    // the first 64 MiB.
    let lowest = 64 << 20;
    let address = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if address < lowest {
        return Err(too_large());
    }
    ram.memory
        .write_slice(&contents, GuestAddress(address))
        .map_err(|e| BootError::LoadInitrd {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    Ok(InitrdPlacement {
        address: GuestAddress(address),
        size,
    })
}
