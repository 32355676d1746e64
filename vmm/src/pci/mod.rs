//! PCI: one host bridge with bus 0, reached through the legacy 0xCF8/0xCFC ports and through
//! ECAM (MMIO, announced in the MCFG), plus the window in the 32-bit hole where device BARs
//! live. This module owns the guest-physical layout of those, the device trait, and the
//! decoding of config and BAR accesses into calls on a device.
//!
//! The buses are fixed before the vCPUs start; a guest that moves a BAR is followed, because
//! BAR accesses are routed by each device's current BAR address rather than by a bus range.

pub mod acpi;
pub mod config_space;
pub mod host_bridge;
pub mod msix;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thiserror::Error;

use crate::bus::BusDevice;

/// Guest-physical start of the window the device BARs are placed in (and which the host
/// bridge's `_CRS` announces).
pub const PCI_MMIO_WINDOW_START: u64 = 0xc000_0000;
/// Size of that window: up to the ECAM region.
pub const PCI_MMIO_WINDOW_SIZE: u64 = 0x2000_0000;
/// ECAM: bus 0's 32 devices × 8 functions × 4 KiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// The legacy configuration mechanism #1: address register at 0xCF8, data at 0xCFC-0xCFF.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// Each device gets this much of the window for its BARs, in slot order.
pub const PCI_DEVICE_WINDOW: u64 = 1 << 20;
/// Devices (slots) on bus 0.
pub const PCI_SLOTS: usize = 32;

const ECAM_FUNCTION_SIZE: u64 = 1 << 12;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI bus 0 is full ({PCI_SLOTS} slots)")]
    BusFull,
}

/// A PCI function as the bus sees it.
pub trait PciDevice: Send {
    /// Reads 1, 2 or 4 bytes of config space at `offset` (below 4096).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// BAR 0's address and size while memory decoding is on.
    fn bar0(&self) -> Option<(u64, u64)>;
    fn bar_read(&mut self, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, offset: u64, data: &[u8]);
}

type SharedDevice = Arc<Mutex<dyn PciDevice>>;

fn lock(device: &SharedDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // Device state stays register-consistent; a panicked vCPU thread takes the VMM down anyway.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bus 0: what sits in each slot (function 0 only).
#[derive(Default)]
pub struct PciRoot {
    slots: Vec<SharedDevice>,
}

impl PciRoot {
    /// Puts `device` in the next free slot and returns the slot number.
    pub fn add(&mut self, device: SharedDevice) -> Result<u8, PciError> {
        if self.slots.len() >= PCI_SLOTS {
            return Err(PciError::BusFull);
        }
        self.slots.push(device);
        // Below PCI_SLOTS (32).
        Ok((self.slots.len() - 1) as u8)
    }

    /// The next slot [`Self::add`] will use.
    pub fn next_slot(&self) -> u8 {
        // At most PCI_SLOTS (32).
        self.slots.len() as u8
    }

    /// Where the BARs of the device in `slot` start.
    pub fn bar_address(slot: u8) -> u64 {
        PCI_MMIO_WINDOW_START + u64::from(slot) * PCI_DEVICE_WINDOW
    }

    fn device(&self, bus: u8, slot: u8, function: u8) -> Option<&SharedDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))
    }

    fn config_read(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.device(bus, slot, function) {
            Some(device) => lock(device).config_read(offset, data),
            // No function there: reads float to all-ones, as an absent vendor ID must.
            None => data.fill(0xff),
        }
    }

    fn config_write(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &[u8]) {
        if let Some(device) = self.device(bus, slot, function) {
            lock(device).config_write(offset, data);
        }
    }
}

/// Splits an access into what a config-space function may see: 1, 2 or 4 bytes that do not
/// cross a dword.
fn valid_config_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && (offset % 4) + len <= 4
}

/// Configuration mechanism #1 at ports 0xCF8-0xCFF.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, slot, function, register offset) the address register selects, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        // Field extraction: each cast keeps exactly the bits of its field.
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let register = (self.address & 0xfc) as usize;
        Some((bus, slot, function, register + data_offset as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        data.fill(0xff);
        if offset < 4 {
            return;
        }
        if let Some((bus, slot, function, register)) = self.target(offset - 4) {
            if valid_config_access(register, data.len()) {
                self.root.config_read(bus, slot, function, register, data);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            // Only dword writes set the address; byte writes to 0xCF9 are a chipset's reset
            // control, which this machine does not have.
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(bytes);
            }
            return;
        }
        if offset < 4 {
            return;
        }
        if let Some((bus, slot, function, register)) = self.target(offset - 4) {
            if valid_config_access(register, data.len()) {
                self.root.config_write(bus, slot, function, register, data);
            }
        }
    }
}

/// ECAM: config space memory-mapped at [`PCI_ECAM_START`], 4 KiB per function.
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigMmio { root }
    }

    fn target(offset: u64) -> (u8, u8, u8, usize) {
        // Field extraction from the ECAM offset (bus 0 only: the region is 1 MiB).
        let bus = (offset >> 20) as u8;
        let slot = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let register = (offset % ECAM_FUNCTION_SIZE) as usize;
        (bus, slot, function, register)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, function, register) = Self::target(offset);
        if valid_config_access(register, data.len()) {
            self.root.config_read(bus, slot, function, register, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, function, register) = Self::target(offset);
        if valid_config_access(register, data.len()) {
            self.root.config_write(bus, slot, function, register, data);
        }
    }
}

/// The BAR window: each access goes to the device whose BAR 0 holds the address now.
pub struct PciBarWindow {
    root: Arc<PciRoot>,
    base: u64,
}

impl PciBarWindow {
    /// The window as a bus device placed at `base`.
    pub fn new(root: Arc<PciRoot>, base: u64) -> Self {
        PciBarWindow { root, base }
    }

    fn with_device(&self, offset: u64, access: impl FnOnce(&mut dyn PciDevice, u64)) -> bool {
        let address = self.base + offset;
        for device in &self.root.slots {
            let mut device = lock(device);
            if let Some((start, size)) = device.bar0() {
                if address >= start && address - start < size {
                    access(&mut *device, address - start);
                    return true;
                }
            }
        }
        false
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut filled = false;
        self.with_device(offset, |device, at| {
            device.bar_read(at, data);
            filled = true;
        });
        if !filled {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.with_device(offset, |device, at| device.bar_write(at, data));
    }
}

#[cfg(test)]
mod tests {
    use super::host_bridge::HostBridge;
    use super::*;

    /// A device with a 4 KiB BAR that records BAR writes.
    struct Probe {
        bar: u64,
        written: Vec<(u64, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.written
                .push((offset as u64 | 0x1000_0000, data.to_vec()));
        }
        fn bar0(&self) -> Option<(u64, u64)> {
            Some((self.bar, 0x1000))
        }
        fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn bar_write(&mut self, offset: u64, data: &[u8]) {
            self.written.push((offset, data.to_vec()));
        }
    }

    fn root_with_probe() -> (Arc<PciRoot>, Arc<Mutex<Probe>>) {
        let mut root = PciRoot::default();
        root.add(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
        let probe = Arc::new(Mutex::new(Probe {
            bar: PciRoot::bar_address(1),
            written: Vec::new(),
        }));
        assert_eq!(root.add(probe.clone()).unwrap(), 1);
        (Arc::new(root), probe)
    }

    fn cf8(slot: u32, register: u32) -> [u8; 4] {
        (CONFIG_ADDRESS_ENABLE | (slot << 11) | register).to_le_bytes()
    }

    #[test]
    fn config_mechanism_one() {
        let (root, probe) = root_with_probe();
        let mut io = PciConfigIo::new(root);
        io.write(0, &cf8(0, 0));
        let mut address = [0u8; 4];
        io.read(0, &mut address);
        assert_eq!(address, cf8(0, 0), "address register reads back");
        let mut id = [0u8; 4];
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), host_bridge::HOST_BRIDGE_ID);
        // Slot 1, register 0x10, byte 2 through port 0xCFE.
        io.write(0, &cf8(1, 0x10));
        let mut byte = [0u8; 1];
        io.read(6, &mut byte);
        assert_eq!(byte, [0x12]);
        io.write(5, &[7, 8]);
        assert_eq!(
            probe.lock().unwrap().written,
            vec![(0x1000_0011, vec![7, 8])]
        );
        // An empty slot and a disabled address read all-ones.
        io.write(0, &cf8(9, 0));
        io.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        // A byte write to 0xCF9 leaves the address alone.
        io.write(1, &[0x06]);
        io.read(0, &mut address);
        assert_eq!(address, [0; 4]);
    }

    #[test]
    fn ecam_reaches_every_slot_and_function() {
        let (root, probe) = root_with_probe();
        let mut ecam = PciConfigMmio::new(root);
        let mut id = [0u8; 4];
        ecam.read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), host_bridge::HOST_BRIDGE_ID);
        let mut word = [0u8; 2];
        ecam.read((1 << 15) | 0x106, &mut word);
        assert_eq!(word, [0x06, 0x06], "extended config space of slot 1");
        ecam.write((1 << 15) | 0x44, &[1, 2, 3, 4]);
        assert_eq!(
            probe.lock().unwrap().written,
            vec![(0x1000_0044, vec![1, 2, 3, 4])]
        );
        // Function 1 of slot 1 does not exist; unaligned accesses read all-ones.
        ecam.read((1 << 15) | (1 << 12), &mut id);
        assert_eq!(id, [0xff; 4]);
        ecam.read((1 << 15) | 3, &mut word);
        assert_eq!(word, [0xff; 2]);
    }

    #[test]
    fn bar_window_follows_the_bar() {
        let (root, probe) = root_with_probe();
        let mut window = PciBarWindow::new(root, PCI_MMIO_WINDOW_START);
        let in_bar = PciRoot::bar_address(1) - PCI_MMIO_WINDOW_START;
        let mut data = [0u8; 2];
        window.read(in_bar + 4, &mut data);
        assert_eq!(data, [5, 5]);
        window.write(in_bar + 8, &[9]);
        assert_eq!(probe.lock().unwrap().written, vec![(8, vec![9])]);
        // Past the BAR, nothing decodes.
        window.read(in_bar + 0x1000, &mut data);
        assert_eq!(data, [0xff; 2]);
        // Moved BAR: the old address is dead, the new one answers.
        probe.lock().unwrap().bar = PCI_MMIO_WINDOW_START + 0x40_0000;
        window.read(in_bar, &mut data);
        assert_eq!(data, [0xff; 2]);
        window.read(0x40_0010, &mut data);
        assert_eq!(data, [0x11, 0x11]);
    }
}
