//! Dispatch of guest port I/O and MMIO exits to the few devices the VMM emulates itself.
//!
//! The bus is built before the vCPUs start and is read-only afterwards, so vCPU threads share
//! it without a lock; each device has its own lock.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device reached through a range of the bus. `offset` is relative to the range's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} for {name} overlaps {other}")]
    Overlap {
        base: u64,
        len: u64,
        name: &'static str,
        other: &'static str,
    },
    #[error("bus range for {0} is empty or wraps around")]
    BadRange(&'static str),
}

struct BusRange {
    base: u64,
    len: u64,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: Vec<BusRange>,
}

impl Bus {
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange(name))?;
        if let Some(other) = self
            .ranges
            .iter()
            .find(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap {
                base,
                len,
                name,
                other: other.name,
            });
        }
        let position = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(
            position,
            BusRange {
                base,
                len,
                name,
                device,
            },
        );
        Ok(())
    }

    fn find(&self, address: u64) -> Option<(&BusRange, u64)> {
        let index = self.ranges.partition_point(|r| r.base <= address);
        let range = self.ranges.get(index.checked_sub(1)?)?;
        let offset = address - range.base;
        (offset < range.len).then_some((range, offset))
    }

    /// Reads from the device at `address`; returns false (leaving `data` alone) if none.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.find(address) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `address`; returns false if none.
    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        match self.find(address) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device whose lock was poisoned by a panic on another vCPU thread is still
/// used: device state is plain registers, and the VMM is going down through that panic anyway.
fn lock(device: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let first = Arc::new(Mutex::new(Recorder::default()));
        let second = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert("second", 0x3f8, 8, second.clone()).unwrap();
        bus.insert("first", 0x60, 5, first.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fb, &mut data));
        assert_eq!(data[0], 3);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(first.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(!bus.read(0x65, &mut data));
        assert!(!bus.write(0x400, &[0]));
        assert!(!bus.read(0x5f, &mut data));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert("a", 0x100, 0x10, device.clone()).unwrap();
        assert!(matches!(
            bus.insert("b", 0x10f, 1, device.clone()),
            Err(BusError::Overlap { other: "a", .. })
        ));
        assert!(matches!(
            bus.insert("c", 0xf8, 0x10, device.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert("d", 0x200, 0, device.clone()),
            Err(BusError::BadRange("d"))
        );
        bus.insert("e", 0x110, 1, device).unwrap();
    }
}
