//! One PCI function's type-0 configuration header and capability list: the registers, which
//! bits of each the guest may change, BAR sizing, and the capability chain.
//!
//! Only the first 256 bytes hold anything; the extended space that ECAM reaches reads as zero
//! (no extended capabilities). Writes are applied through per-register masks, which is all BAR
//! sizing needs: the guest writes all-ones and reads back the address bits that stick.

use thiserror::Error;

/// Bytes of conventional config space we model.
pub const CONFIG_SPACE_SIZE: usize = 256;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;

const VENDOR_ID_REG: usize = 0;
const COMMAND_STATUS_REG: usize = 1;
const CLASS_REG: usize = 2;
const HEADER_TYPE_REG: usize = 3;
const BAR0_REG: usize = 4;
const SUBSYSTEM_REG: usize = 11;
const CAPABILITY_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;

/// Command register bits.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register bit: a capability list starts at the capability pointer.
const STATUS_CAPABILITIES: u32 = 1 << 4;
/// Capabilities start after the standard header and are dword aligned.
const FIRST_CAPABILITY_OFFSET: usize = 0x40;
/// BAR flag bits: 64-bit memory BAR.
const BAR_MEMORY_64: u32 = 0b100;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("capability of {len} bytes does not fit in config space at {offset:#x}")]
    CapabilityTooLarge { offset: usize, len: usize },
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BadBarSize(u64),
    #[error("BAR address {address:#x} is not aligned to its size {size:#x}")]
    UnalignedBar { address: u64, size: u64 },
}

/// What identifies a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// A type-0 header with a capability list.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    /// The next free byte for a capability, and the offset of the last one (to chain).
    next_capability: usize,
    last_capability: Option<usize>,
    /// Size of the 64-bit memory BAR 0/1, when there is one.
    bar0_size: Option<u64>,
}

impl ConfigSpace {
    pub fn new(id: PciIdentity) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[VENDOR_ID_REG] = u32::from(id.vendor_id) | (u32::from(id.device_id) << 16);
        regs[CLASS_REG] = u32::from(id.revision)
            | (u32::from(id.class.2) << 8)
            | (u32::from(id.class.1) << 16)
            | (u32::from(id.class.0) << 24);
        regs[SUBSYSTEM_REG] =
            u32::from(id.subsystem_vendor_id) | (u32::from(id.subsystem_id) << 16);
        // Header type 0, single function; no BIST, latency timer or cache line size to honour.
        regs[HEADER_TYPE_REG] = 0;
        // Memory decode, bus mastering and INTx disable are the guest's to set. Status bits are
        // read-only here: nothing ever reports an error.
        writable[COMMAND_STATUS_REG] =
            u32::from(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
        // Interrupt line is a scratch register for the OS; interrupt pin 0: no INTx.
        writable[INTERRUPT_REG] = 0xff;
        ConfigSpace {
            regs,
            writable,
            next_capability: FIRST_CAPABILITY_OFFSET,
            last_capability: None,
            bar0_size: None,
        }
    }

    /// Makes BARs 0/1 one 64-bit, non-prefetchable memory BAR of `size` bytes at `address`.
    pub fn set_bar0_64(&mut self, address: u64, size: u64) -> Result<(), ConfigSpaceError> {
        if !size.is_power_of_two() || size < 16 {
            return Err(ConfigSpaceError::BadBarSize(size));
        }
        if !address.is_multiple_of(size) {
            return Err(ConfigSpaceError::UnalignedBar { address, size });
        }
        let mask = !(size - 1);
        // Truncation intended: the two halves of the 64-bit address and mask.
        self.regs[BAR0_REG] = (address as u32) | BAR_MEMORY_64;
        self.regs[BAR0_REG + 1] = (address >> 32) as u32;
        self.writable[BAR0_REG] = (mask as u32) & !0xf;
        self.writable[BAR0_REG + 1] = (mask >> 32) as u32;
        self.bar0_size = Some(size);
        Ok(())
    }

    /// BAR 0's current address and size, when there is a BAR 0.
    pub fn bar0(&self) -> Option<(u64, u64)> {
        let size = self.bar0_size?;
        let low = u64::from(self.regs[BAR0_REG] & !0xf);
        let high = u64::from(self.regs[BAR0_REG + 1]);
        Some(((high << 32) | low, size))
    }

    pub fn command(&self) -> u16 {
        // Truncation intended: the command register is the low half.
        self.regs[COMMAND_STATUS_REG] as u16
    }

    /// Appends a capability: `body` is everything after the ID and next-pointer bytes;
    /// `writable` masks (same length as `body`, or empty for read-only) say which bits the
    /// guest may change. Returns the capability's offset in config space.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigSpaceError> {
        let offset = self.next_capability;
        let len = body.len() + 2;
        let end = offset + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::CapabilityTooLarge { offset, len });
        }
        self.set_byte(offset, id);
        self.set_byte(offset + 1, 0);
        for (index, &byte) in body.iter().enumerate() {
            self.set_byte(offset + 2 + index, byte);
        }
        for (index, &mask) in writable.iter().enumerate().take(body.len()) {
            let at = offset + 2 + index;
            let shift = (at % 4) * 8;
            self.writable[at / 4] |= u32::from(mask) << shift;
        }
        match self.last_capability {
            // Offsets are below 256 (checked above), so they fit the 8-bit pointers.
            Some(last) => self.set_byte(last + 1, offset as u8),
            None => {
                self.regs[CAPABILITY_POINTER_REG] = offset as u32;
                self.regs[COMMAND_STATUS_REG] |= STATUS_CAPABILITIES << 16;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = end.next_multiple_of(4);
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// The dword register at `reg` (0..1024 for ECAM; above 64 reads zero).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes (1, 2 or 4, not crossing a dword) from `offset`.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let value = self.read_reg(offset / 4);
        let shift = (offset % 4) * 8;
        for (index, byte) in data.iter_mut().enumerate() {
            let bit = shift + index * 8;
            *byte = if bit < 32 { (value >> bit) as u8 } else { 0 };
        }
    }

    /// Writes `data` at `offset` through the writable masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let reg = offset / 4;
        if reg >= NUM_REGS || data.is_empty() || (offset % 4) + data.len() > 4 {
            return;
        }
        let shift = (offset % 4) * 8;
        let mut value = 0u32;
        let mut touched = 0u32;
        for (index, &byte) in data.iter().enumerate() {
            value |= u32::from(byte) << (shift + index * 8);
            touched |= 0xff << (shift + index * 8);
        }
        let mask = self.writable[reg] & touched;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: (0x01, 0x80, 0x00),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    fn read32(config: &ConfigSpace, offset: usize) -> u32 {
        let mut data = [0u8; 4];
        config.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn header_identifies_the_function() {
        let config = ConfigSpace::new(identity());
        assert_eq!(read32(&config, 0), 0x1042_1af4);
        assert_eq!(read32(&config, 8), 0x0180_0001);
        assert_eq!(read32(&config, 0x2c), 0x1100_1af4);
        let mut vendor = [0u8; 2];
        config.read(0, &mut vendor);
        assert_eq!(u16::from_le_bytes(vendor), 0x1af4);
        // No capabilities yet: status bit clear.
        assert_eq!(read32(&config, 4) & (STATUS_CAPABILITIES << 16), 0);
        // Extended config space reads zero.
        assert_eq!(config.read_reg(0x100 / 4), 0);
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut config = ConfigSpace::new(identity());
        config.write(0, &[0xff, 0xff, 0xff, 0xff]);
        config.write(8, &[0, 0, 0, 0]);
        assert_eq!(read32(&config, 0), 0x1042_1af4);
        assert_eq!(read32(&config, 8), 0x0180_0001);
        config.write(4, &[0xff, 0xff]);
        assert_eq!(config.command(), 0x0406);
        // A write that crosses a dword is dropped.
        config.write(0x3e, &[1, 2, 3, 4]);
        assert_eq!(read32(&config, 0x3c), 0);
    }

    #[test]
    fn bar_sizing_and_moving() {
        let mut config = ConfigSpace::new(identity());
        config.set_bar0_64(0xc000_0000, 0x8000).unwrap();
        assert_eq!(read32(&config, 0x10), 0xc000_0004);
        assert_eq!(read32(&config, 0x14), 0);
        // Sizing: all-ones, read back, restore.
        config.write(0x10, &[0xff; 4]);
        config.write(0x14, &[0xff; 4]);
        assert_eq!(read32(&config, 0x10), 0xffff_8004);
        assert_eq!(read32(&config, 0x14), 0xffff_ffff);
        config.write(0x10, &0xd000_8000u32.to_le_bytes());
        config.write(0x14, &1u32.to_le_bytes());
        assert_eq!(config.bar0(), Some((0x1_d000_8000, 0x8000)));
        // BARs 2-5 are absent: they read zero whatever is written.
        config.write(0x18, &[0xff; 4]);
        assert_eq!(read32(&config, 0x18), 0);
        assert_eq!(
            config.set_bar0_64(0x1000, 0x3000),
            Err(ConfigSpaceError::BadBarSize(0x3000))
        );
        assert!(matches!(
            config.set_bar0_64(0x1000, 0x8000),
            Err(ConfigSpaceError::UnalignedBar { .. })
        ));
    }

    #[test]
    fn capabilities_chain_with_masks() {
        let mut config = ConfigSpace::new(identity());
        let first = config
            .add_capability(0x11, &[0x12, 0x34], &[0, 0xc0])
            .unwrap();
        let second = config.add_capability(0x09, &[16, 1, 0, 0], &[]).unwrap();
        assert_eq!((first, second), (0x40, 0x44));
        assert_ne!(read32(&config, 4) & (STATUS_CAPABILITIES << 16), 0);
        assert_eq!(read32(&config, 0x34) & 0xff, 0x40);
        assert_eq!(read32(&config, 0x40), 0x3412_4411);
        assert_eq!(read32(&config, 0x44), 0x0110_0009);
        // Only the top two bits of the second body byte are writable.
        config.write(0x42, &[0xff, 0xff]);
        assert_eq!(read32(&config, 0x40), 0xf412_4411);
        config.write(0x44, &[0xff; 4]);
        assert_eq!(read32(&config, 0x44), 0x0110_0009);
        let big = vec![0u8; 200];
        assert!(matches!(
            config.add_capability(0x09, &big, &[]),
            Err(ConfigSpaceError::CapabilityTooLarge { .. })
        ));
    }
}
