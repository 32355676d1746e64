//! The host bridge at 00.0: it has no registers of its own, but Linux's probe of
//! configuration mechanism #1 checks that bus 0 has a host bridge (or an Intel/Compaq device)
//! before it trusts the ports.

use super::config_space::{ConfigSpace, PciIdentity};
use super::PciDevice;

/// Red Hat's PCI vendor ID with QEMU's "PCIe host bridge" device ID: a generic host bridge
/// with nothing to configure, which no driver binds to.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Register 0 (vendor and device ID) as the guest reads it.
pub const HOST_BRIDGE_ID: u32 = ((HOST_BRIDGE_DEVICE as u32) << 16) | HOST_BRIDGE_VENDOR as u32;

pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(PciIdentity {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                revision: 0,
                // Bridge device, host bridge.
                class: (0x06, 0x00, 0x00),
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bar0(&self) -> Option<(u64, u64)> {
        None
    }

    fn bar_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _offset: u64, _data: &[u8]) {}
}
