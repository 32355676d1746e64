//! The guest's ACPI tables, and the contract between them and the VMM's devices.
//!
//! The Debian cloud kernel finds secondary vCPUs only through an ACPI MADT (it has no MP-table
//! parser), and powers off only through ACPI. Like Cloud Hypervisor we describe a
//! *hardware-reduced* ACPI platform: no PM1/GPE fixed hardware, no SCI, no FACS; sleep control,
//! sleep status and reset are three registers in one small I/O-port device that the VMM emulates
//! (`devices::power`). This module owns the tables (RSDP, XSDT, FADT, MADT, MCFG, DSDT; the PCI
//! pieces come from `crate::pci::acpi`), where they live in guest memory, the port numbers and
//! values they announce, and the decoding of what the guest writes to the sleep-control register.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize::ByteAccess, AddressSpace::SystemIo, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::config::MAX_VCPUS;
use crate::devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN};
use crate::pci::acpi as pci_acpi;

/// I/O port of the ACPI sleep-control register (1 byte; the guest writes `SLP_EN | SLP_TYP`).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the ACPI sleep-status register (1 byte). Linux writes WAK_STS (0x80) here before
/// sleeping; reads may return 0, since power-off never comes back.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// I/O port of the FADT reset register. As in Cloud Hypervisor it shares the sleep-control port:
/// the reset value sets only bit 0, which is reserved in the sleep-control register, so a device
/// can tell the two apart (check `value == ACPI_RESET_VALUE` first, then [`decode_sleep_control`]).
pub const ACPI_RESET_PORT: u16 = ACPI_SLEEP_CONTROL_PORT;
/// Value the guest writes to [`ACPI_RESET_PORT`] to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP that the DSDT's `\_S5` package announces for soft-off.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// Start of the guest-physical window holding the tables (the e820 map must mark it reserved).
/// The RSDP sits at its start, so Linux also finds it by scanning the BIOS area 0xe0000-0xfffff.
pub const ACPI_TABLES_START: u64 = 0x000e_0000;
/// End (exclusive) of the ACPI table window.
pub const ACPI_TABLES_END: u64 = 0x0010_0000;
/// Guest-physical base of KVM's in-kernel I/O APIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Guest-physical base of the local APICs.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

// Sleep-control register (ACPI 6.x, 4.8.3.7): bits 2-4 SLP_TYP, bit 5 SLP_EN, the rest reserved.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u8 = 1 << 5;

// Table identity. The FADT's OEM table ID must equal the XSDT's (ACPI 5.2.9), so every table uses
// the same one; the signature tells them apart. Creator ID/revision are acpi_tables' own ("RVAT")
// on every table, since that crate serialises them all.
const OEM_ID: [u8; 6] = *b"SPLVMM";
const OEM_TABLE_ID: [u8; 8] = *b"SPLITVMM";
const OEM_REVISION: u32 = 1;

const TABLE_HEADER_LEN: u32 = 36;
// Tables start on 16-byte boundaries: the RSDP must (the BIOS-area scan steps by 16), the others
// are just easier to read in a hex dump.
const TABLE_ALIGN: u64 = 16;

// ACPI 6.3 throughout, as Cloud Hypervisor announces: FADT 6.3 (same 276-byte layout as 6.0-6.5),
// MADT revision 5, DSDT revision 2 (64-bit AML integers).
const FADT_MINOR_VERSION: u8 = 3;
const MADT_REVISION: u8 = 5;
const DSDT_REVISION: u8 = 2;

// IA-PC boot architecture flags (FADT IAPC_BOOT_ARCH, ACPI 5.2.9.3).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// What we announce, and why each other bit stays clear:
/// - LEGACY_DEVICES (bit 0) clear: the only user-visible legacy device, COM1, is in the DSDT.
/// - 8042 (bit 1) clear: our i8042 is only its reset line (Linux's `reboot=k` writes 0x64
///   without asking ACPI). With the bit set, Linux's i8042 driver probes 0x60/0x64 and waits out
///   ~500 ms timeouts on a controller that never answers; clear, it gives up at once.
/// - VGA_NOT_PRESENT (bit 2) set: there is no VGA; Linux then does not probe for one.
/// - MSI_NOT_SUPPORTED (bit 3) clear: virtio-pci needs MSI-X (Linux would call `pci_no_msi()`).
/// - PCIE_ASPM_CONTROLS (bit 4) set: virtual links have no power states to manage.
/// - CMOS_RTC_NOT_PRESENT (bit 5) set: nothing answers ports 0x70/0x71; Linux then registers no
///   rtc_cmos device.
const IAPC_BOOT_ARCH: u16 =
    IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT;

// MADT flag: the machine also has dual 8259s (KVM_CREATE_IRQCHIP creates them), which the OS must
// mask when it uses the APICs.
const MADT_PCAT_COMPAT: u32 = 1;
// KVM's in-kernel IOAPIC resets its ID register to 0. Linux uses the MADT's ID as-is on xAPIC CPUs
// (it renumbers only pre-xAPIC Intel parts), and IOAPIC and local APIC IDs are separate
// namespaces there, so 0 does not clash with vCPU 0.
const IOAPIC_ID: u8 = 0;
// Narrower copies for table fields: the MADT's addresses are 32 bits, the DSDT IO descriptor's
// port 16 bits and its length 8 bits.
const LAPIC_ADDR_32: u32 = fits(LAPIC_ADDR, u32::MAX as u64) as u32;
const IOAPIC_ADDR_32: u32 = fits(IOAPIC_ADDR, u32::MAX as u64) as u32;
const COM1_PORT: u16 = fits(COM1_BASE, u16::MAX as u64) as u16;
const COM1_PORT_LEN: u8 = fits(COM1_LEN, u8::MAX as u64) as u8;

/// `value`, once it is known to be at most `max`. Used in constants, so it runs at compile time:
/// a value too wide fails the build, and the `as` casts above cannot truncate.
const fn fits(value: u64, max: u64) -> u64 {
    assert!(value <= max, "constant too wide for its ACPI field");
    value
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct AcpiConfig {
    /// vCPUs 0..num_vcpus, each with APIC ID = ACPI processor UID = its index.
    pub num_vcpus: u8,
    // The PCI host bridge (MCFG, `\_SB_.PCI0`) is always there; its layout is `crate::pci`'s.
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("cannot describe {0} vCPUs in the MADT: 1 to {MAX_VCPUS} are supported")]
    InvalidVcpuCount(u8),
    #[error(
        "ACPI table {table} ({len} bytes at {addr:#x}) does not fit in the ACPI window \
         [{ACPI_TABLES_START:#x}, {ACPI_TABLES_END:#x})"
    )]
    TableTooLarge {
        table: &'static str,
        addr: u64,
        len: usize,
    },
    #[error("cannot write ACPI table {table} to guest memory at {addr:#x}: {source}")]
    WriteTable {
        table: &'static str,
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}

/// A request the guest made through the sleep-control register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepRequest {
    /// SLP_EN with SLP_TYP = S5: soft-off.
    PowerOff,
}

/// Decodes a byte written to [`ACPI_SLEEP_CONTROL_PORT`]: `Some(PowerOff)` when SLP_EN is set and
/// SLP_TYP is [`ACPI_S5_SLP_TYP`] (Linux writes exactly `(5 << 2) | (1 << 5)` = 0x34); `None` for
/// anything else, including SLP_TYP writes without SLP_EN and sleep states we never announce.
/// Reserved bits are ignored, as a hardware register decodes only its fields.
pub fn decode_sleep_control(value: u8) -> Option<SleepRequest> {
    let slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
    (value & SLP_EN != 0 && slp_typ == ACPI_S5_SLP_TYP).then_some(SleepRequest::PowerOff)
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT into guest memory inside
/// [`ACPI_TABLES_START`, `ACPI_TABLES_END`) and returns the RSDP's address (for
/// `boot_params.acpi_rsdp_addr` / PVH `start_info.rsdp_paddr`). Nothing is written unless every
/// table fits. No FACS: a hardware-reduced platform with no waking vector needs none.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    config: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if !(1..=MAX_VCPUS).contains(&config.num_vcpus) {
        return Err(AcpiError::InvalidVcpuCount(config.num_vcpus));
    }

    // The RSDP goes first, at the window's start; the rest follow. Tables are laid out before
    // anything is written because each refers to the addresses of the ones it points at.
    let mut layout = Layout::new(ACPI_TABLES_START + Rsdp::len() as u64);
    let dsdt = layout.place("DSDT", create_dsdt())?;
    let fadt = layout.place("FACP", create_fadt(dsdt))?;
    let madt = layout.place("APIC", create_madt(config.num_vcpus))?;
    let mcfg = layout.place(
        "MCFG",
        pci_acpi::mcfg_bytes(OEM_ID, OEM_TABLE_ID, OEM_REVISION),
    )?;
    let xsdt = layout.place("XSDT", create_xsdt(&[fadt, madt, mcfg]))?;
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt));
    layout.tables.push(("RSDP", ACPI_TABLES_START, rsdp));

    for (table, addr, bytes) in &layout.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|source| AcpiError::WriteTable {
                table,
                addr: *addr,
                source,
            })?;
    }
    Ok(GuestAddress(ACPI_TABLES_START))
}

/// Tables placed one after another in the window, each [`TABLE_ALIGN`]ed.
struct Layout {
    next: u64,
    /// (name, guest address, bytes)
    tables: Vec<(&'static str, u64, Vec<u8>)>,
}

impl Layout {
    fn new(start: u64) -> Self {
        Layout {
            next: start,
            tables: Vec::new(),
        }
    }

    /// Reserves room for `bytes` and returns its guest address, or an error if it would cross
    /// [`ACPI_TABLES_END`].
    fn place(&mut self, name: &'static str, bytes: Vec<u8>) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let too_large = AcpiError::TableTooLarge {
            table: name,
            addr,
            len: bytes.len(),
        };
        let end = u64::try_from(bytes.len())
            .ok()
            .and_then(|len| addr.checked_add(len))
            .filter(|&end| end <= ACPI_TABLES_END)
            .ok_or(too_large)?;
        self.next = end;
        self.tables.push((name, addr, bytes));
        Ok(addr)
    }
}

/// A table of `len` bytes (header and zeroes) with our identity. `Sdt::new` asserts
/// `len >= 36`, which every caller's constant satisfies.
fn sdt(signature: [u8; 4], len: u32, revision: u8) -> Sdt {
    Sdt::new(signature, len, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION)
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// An 8-bit register in system I/O space.
fn io_port_register(port: u16) -> GAS {
    GAS::new(SystemIo, 8, 0, ByteAccess, u64::from(port))
}

fn create_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &entry in entries {
        xsdt.add_entry(entry);
    }
    bytes_of(&xsdt)
}

fn create_fadt(dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        // 64-bit X_DSDT only: ACPICA prefers it, and a zero 32-bit DSDT cannot disagree with it.
        .dsdt_64(dsdt)
        // No PM1/GPE blocks, no SCI: sleep and reset go through the registers below.
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power/sleep buttons; without these Linux would register phantom
        // LNXPWRBN/LNXSLPBN button devices.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.fadt_minor_version = FADT_MINOR_VERSION;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_port_register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    // Linux's hardware-reduced sleep path (and its check that S5 is usable at all) needs both.
    fadt.sleep_control_reg = io_port_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_register(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(OEM_TABLE_ID).into();
    bytes_of(&fadt.finalize())
}

fn create_madt(num_vcpus: u8) -> Vec<u8> {
    const MADT_HEADER_LEN: u32 = TABLE_HEADER_LEN + 8;
    // acpi_tables' own MADT type cannot set the flags field, so build it on a generic SDT.
    // write_u32 asserts in-bounds offsets: 36 and 40 are inside the 44-byte header.
    let mut madt = sdt(*b"APIC", MADT_HEADER_LEN, MADT_REVISION);
    madt.write_u32(36, LAPIC_ADDR_32);
    madt.write_u32(40, MADT_PCAT_COMPAT);

    let mut entries = Vec::new();
    for index in 0..num_vcpus {
        // ACPI processor UID = APIC ID = vCPU index, as the vCPU setup programs the APIC IDs.
        ProcessorLocalApic::new(index, index, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(IOAPIC_ID, IOAPIC_ADDR_32, 0).to_aml_bytes(&mut entries);
    // Deliberately no Interrupt Source Override for IRQ0 -> GSI2, unlike real PCs: KVM's default
    // routing sends GSI n to IOAPIC pin n and its in-kernel PIT raises GSI 0, so an override
    // would point Linux at pin 2, which nothing drives (Firecracker and Cloud Hypervisor add none
    // either). Identity-mapped ISA IRQs need no other override.
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

fn create_dsdt() -> Vec<u8> {
    let mut dsdt = sdt(*b"DSDT", TABLE_HEADER_LEN, DSDT_REVISION);
    let mut body = Vec::new();
    // \_S5_: {SLP_TYPa, SLP_TYPb}. Hardware-reduced sleep uses SLP_TYPa only.
    let s5 = aml::Package::new(vec![&ACPI_S5_SLP_TYP, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    // Devices go under \_SB_: COM1 and the PCI host bridge (with its ECAM reservation).
    let pci = pci_acpi::PciHostBridgeAml;
    aml::Scope::new("\\_SB_".into(), vec![&Com1 as &dyn Aml, &pci]).to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// COM1 in the namespace. Linux needs it even though 0x3f8 is a legacy port it would probe: on a
/// hardware-reduced platform it installs no legacy PIC and pre-maps no ISA IRQs, so the 8250's
/// IRQ 4 works only once ACPI (the PNP0501 device's _CRS) registers GSI 4.
struct Com1;

impl Aml for Com1 {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        // The names and the EISA ID are constants that satisfy Path's 4-character and
        // EISAName's "UUUNNNN" assertions.
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN);
        // ISA-style: edge-triggered, active-high, exclusive.
        let irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
        aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Little-endian integer of `len` bytes at `at`.
    fn le(bytes: &[u8], at: usize, len: usize) -> u64 {
        let mut buf = [0; 8];
        buf[..len].copy_from_slice(&bytes[at..at + len]);
        u64::from_le_bytes(buf)
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b))
    }

    /// Guest memory covering the low 1 MiB and more, as the VMM's RAM does.
    fn low_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// The table at `addr`, after checking its signature, bounds, checksum and OEM IDs.
    fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let len = le(&read(mem, addr, 36), 4, 4);
        let bytes = read(mem, addr, len as usize);
        assert_eq!(&bytes[0..4], signature, "signature at {addr:#x}");
        assert!(addr >= ACPI_TABLES_START && addr + len <= ACPI_TABLES_END);
        assert_eq!(sum(&bytes), 0, "checksum at {addr:#x}");
        assert_eq!(bytes[10..24], [&OEM_ID[..], &OEM_TABLE_ID].concat());
        bytes
    }

    /// Builds the tables for `num_vcpus` and returns FADT, MADT and DSDT, found by following the
    /// pointers from the RSDP.
    fn build(num_vcpus: u8) -> [Vec<u8>; 3] {
        let mem = low_memory();
        let config = AcpiConfig { num_vcpus };
        let rsdp_addr = create_acpi_tables(&mem, &config).unwrap().0;
        assert_eq!(rsdp_addr, ACPI_TABLES_START);
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!((rsdp[15], le(&rsdp, 20, 4)), (2, 36), "revision, length");
        assert_eq!((sum(&rsdp[0..20]), sum(&rsdp)), (0, 0), "RSDP checksums");
        let xsdt_addr = le(&rsdp, 24, 8);
        let xsdt = table(&mem, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 3 * 8, "XSDT lists FADT, MADT and MCFG");
        table(&mem, le(&xsdt, 52, 8), b"MCFG");
        let (fadt_addr, madt_addr) = (le(&xsdt, 36, 8), le(&xsdt, 44, 8));
        let fadt = table(&mem, fadt_addr, b"FACP");
        let madt = table(&mem, madt_addr, b"APIC");
        let dsdt_addr = le(&fadt, 140, 8);
        let dsdt = table(&mem, dsdt_addr, b"DSDT");

        // No two tables overlap.
        let addrs = [rsdp_addr, xsdt_addr, fadt_addr, madt_addr, dsdt_addr];
        let lens = [36, xsdt.len(), fadt.len(), madt.len(), dsdt.len()];
        let spans = addrs.iter().zip(lens).map(|(&a, len)| (a, a + len as u64));
        let mut spans: Vec<_> = spans.collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:x?}");
        [fadt, madt, dsdt]
    }

    /// A GAS for an 8-bit register at `port` in system I/O space.
    fn io_gas(port: u16) -> Vec<u8> {
        [&[1, 8, 0, 1][..], &u64::from(port).to_le_bytes()].concat()
    }

    #[test]
    fn fadt_describes_hw_reduced_platform() {
        let [fadt, ..] = build(1);
        let version = (fadt.len(), fadt[8], fadt[131]);
        assert_eq!(version, (276, 6, FADT_MINOR_VERSION));
        // Exactly HW_REDUCED_ACPI, RESET_REG_SUP, PWR_BUTTON and SLP_BUTTON.
        let flags = (1 << 20) | (1 << 10) | (1 << 4) | (1 << 5);
        assert_eq!(le(&fadt, 112, 4), flags, "FADT flags");
        assert_eq!(le(&fadt, 109, 2), u64::from(IAPC_BOOT_ARCH));
        assert_eq!(IAPC_BOOT_ARCH & (1 << 3), 0, "MSIs must stay allowed");
        assert_eq!(fadt[116..128], io_gas(ACPI_RESET_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        assert_eq!(fadt[244..256], io_gas(ACPI_SLEEP_CONTROL_PORT));
        assert_eq!(fadt[256..268], io_gas(ACPI_SLEEP_STATUS_PORT));
        // The DSDT only through X_DSDT (build() followed it); no FACS.
        let unused = [le(&fadt, 36, 4), le(&fadt, 40, 4), le(&fadt, 132, 8)];
        assert_eq!(unused, [0; 3]);
    }

    #[test]
    fn madt_lists_every_vcpu_and_one_ioapic() {
        for num_vcpus in [1u8, 2, 8, MAX_VCPUS] {
            let [_, madt, _] = build(num_vcpus);
            assert_eq!(le(&madt, 36, 4), LAPIC_ADDR);
            assert_eq!(le(&madt, 40, 4), u64::from(MADT_PCAT_COMPAT));
            let mut entries = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                let len = usize::from(madt[at + 1]);
                assert!(len >= 2 && at + len <= madt.len(), "entry at {at}");
                entries.push(&madt[at..at + len]);
                at += len;
            }
            let lapics: Vec<_> = entries.iter().filter(|e| e[0] == 0).collect();
            assert_eq!(lapics.len(), usize::from(num_vcpus));
            for (index, lapic) in lapics.iter().enumerate() {
                // UID = APIC ID = index, enabled.
                let id = index as u8;
                assert_eq!((lapic[2], lapic[3], le(lapic, 4, 4)), (id, id, 1));
            }
            let ioapic = entries.iter().find(|e| e[0] == 1).unwrap();
            let fields = (ioapic[2], le(ioapic, 4, 4), le(ioapic, 8, 4));
            assert_eq!(fields, (IOAPIC_ID, IOAPIC_ADDR, 0));
            assert_eq!(entries.len(), lapics.len() + 1, "no overrides");
        }
    }

    #[test]
    fn dsdt_announces_s5_and_com1() {
        let [_, _, dsdt] = build(2);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        // NameOp "_S5_" PackageOp PkgLength NumElements(2) BytePrefix 5 ZeroOp
        let s5_package = [0x12, 5, 2, 0x0a, ACPI_S5_SLP_TYP, 0];
        assert!(has(&[&[0x08][..], b"_S5_", &s5_package].concat()));
        assert!(has(b"_SB_") && has(b"COM1"));
        // _HID EISAID("PNP0501") = DWordPrefix 0x0105d041.
        assert!(has(&[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]));
        // _CRS: IO(Decode16, 0x3f8, 0x3f8, 1, 8) and Interrupt(consumer, edge, high) {4}.
        assert!(has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]));
    }

    #[test]
    fn writes_nothing_outside_the_window() {
        let mem = low_memory();
        let below = GuestAddress(ACPI_TABLES_START - 0x1000);
        let above = GuestAddress(ACPI_TABLES_END);
        for addr in [below, above] {
            mem.write_slice(&[0xa5; 0x1000], addr).unwrap();
        }
        let num_vcpus = MAX_VCPUS;
        create_acpi_tables(&mem, &AcpiConfig { num_vcpus }).unwrap();
        for addr in [below, above] {
            assert!(read(&mem, addr.0, 0x1000).iter().all(|&b| b == 0xa5));
        }
    }

    #[test]
    fn errors_instead_of_panicking() {
        let mem = low_memory();
        for num_vcpus in [0, MAX_VCPUS + 1] {
            let err = create_acpi_tables(&mem, &AcpiConfig { num_vcpus });
            assert!(matches!(err, Err(AcpiError::InvalidVcpuCount(n)) if n == num_vcpus));
        }
        let last = ACPI_TABLES_END - 64;
        let mut layout = Layout::new(last);
        assert_eq!(layout.place("T1", vec![0; 64]).ok(), Some(last));
        let err = layout.place("T2", vec![0; 1]);
        assert!(matches!(err, Err(AcpiError::TableTooLarge { .. })));
        // Guest memory that does not reach the window.
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = create_acpi_tables(&small, &AcpiConfig { num_vcpus: 1 });
        assert!(matches!(err, Err(AcpiError::WriteTable { .. })));
    }

    #[test]
    fn sleep_control_decodes_only_s5_with_slp_en() {
        let power_off = (ACPI_S5_SLP_TYP << 2) | (1 << 5);
        // What Linux's acpi_hw_extended_sleep() writes for S5.
        assert_eq!(power_off, 0x34);
        for value in 0..=u8::MAX {
            // Only SLP_TYP (bits 2-4) and SLP_EN (bit 5) matter.
            let is_s5 = (value & 0b0011_1100) == power_off;
            let expected = is_s5.then_some(SleepRequest::PowerOff);
            assert_eq!(decode_sleep_control(value), expected, "{value:#04x}");
        }
        assert_eq!(decode_sleep_control(ACPI_RESET_VALUE), None);
    }
}
