//! The virtio-pci modern transport (virtio 1.2, 4.1): one 64-bit memory BAR holding the common
//! config, ISR, device config, notify region and the MSI-X table and PBA, with the vendor
//! capabilities that point at them.
//!
//! The VMM is only on the control path. Each queue's notify address is a KVM ioeventfd whose
//! eventfd goes to the device as the kick fd; each queue's call eventfd is a KVM irqfd on the
//! GSI its MSI-X vector is routed to. After DRIVER_OK the guest and the backend talk through
//! those without this code running.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::common_cfg::{CommonCfg, CommonWrite, COMMON_CFG_SIZE, NO_VECTOR};
use super::{
    ActiveQueue, VirtioDevice, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use crate::interrupts::{InterruptError, InterruptRoutes};
use crate::pci::config_space::{ConfigSpace, ConfigSpaceError, PciIdentity, COMMAND_MEMORY_SPACE};
use crate::pci::msix::{MsixChange, MsixState, MSIX_CAPABILITY_ID};
use crate::pci::PciDevice;

/// Red Hat's virtio vendor ID; modern device IDs are 0x1040 + the virtio device type.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;

/// BAR 0 layout: one 4 KiB page per structure, so each can be mapped on its own.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Queue n's notify address is NOTIFY_OFFSET + n * this.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const NOTIFY_SIZE: u64 = 0x1000;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
pub const BAR_SIZE: u64 = 0x8000;
/// Most queues one device may have: the notify region and the MSI-X table must hold them.
pub const MAX_QUEUES: u16 = 64;

const VIRTIO_CAPABILITY_ID: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("{name}: {count} queues is more than the {MAX_QUEUES} a virtio-pci device may have")]
    TooManyQueues { name: String, count: u16 },
    #[error("{name}: cannot lay out config space: {source}")]
    ConfigSpace {
        name: String,
        source: ConfigSpaceError,
    },
    #[error("{name}: cannot create eventfds: {source}")]
    EventFd {
        name: String,
        source: std::io::Error,
    },
    #[error("{name}: {source}")]
    Interrupts {
        name: String,
        source: InterruptError,
    },
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    device: Box<dyn VirtioDevice>,
    config: ConfigSpace,
    msix_capability: usize,
    msix: MsixState,
    common: CommonCfg,
    interrupts: Arc<InterruptRoutes>,
    first_gsi: u32,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// Where the kick ioeventfds are registered (BAR 0's base), if they are.
    ioevents_at: Option<u64>,
    /// Per queue: the GSI its call eventfd is attached to as an irqfd.
    attached: Vec<Option<u32>>,
    /// The device is running: DRIVER_OK went through `activate`.
    active: bool,
}

impl VirtioPciDevice {
    /// Wraps `device` with its BAR 0 at `bar_address`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_address: u64,
        interrupts: Arc<InterruptRoutes>,
    ) -> Result<Self, TransportError> {
        let name = device.name().to_owned();
        let num_queues = device.num_queues();
        if num_queues > MAX_QUEUES {
            return Err(TransportError::TooManyQueues {
                name,
                count: num_queues,
            });
        }
        let layout = |source| TransportError::ConfigSpace {
            name: name.clone(),
            source,
        };
        let device_type = device.device_type();
        let mut config = ConfigSpace::new(PciIdentity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type,
            // Modern-only devices have revision 1 or more (virtio 1.2, 4.1.2.1).
            revision: 1,
            class: pci_class(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40 + device_type,
        });
        config.set_bar0_64(bar_address, BAR_SIZE).map_err(layout)?;
        // One vector per queue plus one for config changes.
        let msix = MsixState::new(num_queues + 1);
        let (body, writable) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_capability = config
            .add_capability(MSIX_CAPABILITY_ID, &body, &writable)
            .map_err(layout)?;
        let notify_len = u64::from(num_queues) * u64::from(NOTIFY_OFF_MULTIPLIER);
        for (kind, offset, len) in [
            (CAP_COMMON, COMMON_CFG_OFFSET, COMMON_CFG_SIZE),
            (CAP_ISR, ISR_OFFSET, 1),
            (CAP_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE),
        ] {
            config
                .add_capability(VIRTIO_CAPABILITY_ID, &virtio_cap(kind, offset, len), &[])
                .map_err(layout)?;
        }
        let mut notify = virtio_cap(CAP_NOTIFY, NOTIFY_OFFSET, notify_len.max(2)).to_vec();
        notify[0] += 4;
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config
            .add_capability(VIRTIO_CAPABILITY_ID, &notify, &[])
            .map_err(layout)?;

        let eventfds = || {
            (0..num_queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| TransportError::EventFd {
                    name: name.clone(),
                    source,
                })
        };
        let kicks = eventfds()?;
        let calls = eventfds()?;
        let first_gsi =
            interrupts
                .allocate(msix.vectors())
                .map_err(|source| TransportError::Interrupts {
                    name: name.clone(),
                    source,
                })?;
        let common = CommonCfg::new(
            device.device_features(),
            num_queues,
            device.queue_max_size(),
            msix.vectors(),
        );
        Ok(VirtioPciDevice {
            device,
            config,
            msix_capability,
            msix,
            common,
            interrupts,
            first_gsi,
            kicks,
            calls,
            ioevents_at: None,
            attached: vec![None; usize::from(num_queues)],
            active: false,
        })
    }

    fn name(&self) -> &str {
        self.device.name()
    }

    /// Registers the kick ioeventfds at BAR 0's current address while memory decoding is on,
    /// and moves them when the guest moves the BAR.
    fn sync_ioevents(&mut self) {
        let want = self.bar0().map(|(base, _)| base);
        if want == self.ioevents_at {
            return;
        }
        let vm = self.interrupts.vm();
        for (index, kick) in self.kicks.iter().enumerate() {
            let at = |base: u64| {
                IoEventAddress::Mmio(
                    base + NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                )
            };
            if let Some(old) = self.ioevents_at {
                if let Err(error) = vm.unregister_ioevent(kick, &at(old), NoDatamatch) {
                    log::warn!(
                        "{}: cannot unregister queue {index}'s kick: {error}",
                        self.device.name()
                    );
                }
            }
            if let Some(new) = want {
                if let Err(error) = vm.register_ioevent(kick, &at(new), NoDatamatch) {
                    // The notify write then exits to the VMM, which forwards it (bar_write).
                    log::warn!(
                        "{}: cannot register queue {index}'s kick: {error}",
                        self.device.name()
                    );
                }
            }
        }
        self.ioevents_at = want;
    }

    /// Re-programs the MSI routes of `change` and attaches or detaches each queue's irqfd so
    /// that exactly the queues whose vector is deliverable have one.
    fn sync_interrupts(&mut self, change: MsixChange) {
        let wanted: Vec<Option<u32>> = self
            .common
            .queues
            .iter()
            .map(|queue| {
                (queue.vector != NO_VECTOR && self.msix.active_message(queue.vector).is_some())
                    .then(|| self.first_gsi + u32::from(queue.vector))
            })
            .collect();
        // Detach first, route, attach last: an irqfd never points at a GSI whose route is
        // being taken away, so a signal in between waits in the eventfd instead of being lost.
        let vm = self.interrupts.vm();
        for (index, want) in wanted.iter().enumerate() {
            if let Some(old) = self.attached[index].filter(|old| Some(*old) != *want) {
                if let Err(error) = vm.unregister_irqfd(&self.calls[index], old) {
                    log::warn!(
                        "{}: cannot detach queue {index}'s interrupt: {error}",
                        self.device.name()
                    );
                }
                self.attached[index] = None;
            }
        }
        let vectors: Vec<u16> = match change {
            MsixChange::None => Vec::new(),
            MsixChange::Vector(vector) => vec![vector],
            MsixChange::All => (0..self.msix.vectors()).collect(),
        };
        if !vectors.is_empty() {
            let routes: Vec<_> = vectors
                .iter()
                .map(|&v| (self.first_gsi + u32::from(v), self.msix.active_message(v)))
                .collect();
            if let Err(error) = self.interrupts.update(&routes) {
                log::error!("{}: {error}", self.device.name());
            }
        }
        for (index, want) in wanted.into_iter().enumerate() {
            let Some(gsi) = want.filter(|_| self.attached[index].is_none()) else {
                continue;
            };
            // KVM injects at once if the eventfd was signalled while detached.
            match vm.register_irqfd(&self.calls[index], gsi) {
                Ok(()) => self.attached[index] = Some(gsi),
                Err(error) => log::error!(
                    "{}: cannot attach queue {index}'s interrupt to GSI {gsi}: {error}",
                    self.device.name()
                ),
            }
        }
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            if self.active {
                self.device.reset();
                self.active = false;
            }
            self.common.reset();
            self.sync_interrupts(MsixChange::None);
            log::debug!("{}: reset by the driver", self.name());
            return;
        }
        let mut status = status;
        let newly = status & !self.common.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let acked = self.common.driver_features;
            let offered = self.common.device_features;
            if acked & !offered != 0 || acked & (1 << VIRTIO_F_VERSION_1) == 0 {
                log::warn!(
                    "{}: driver acked features {acked:#x}, device offers {offered:#x}: refusing FEATURES_OK",
                    self.name()
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK != 0 && !self.active {
            self.common.status = status;
            self.activate();
            return;
        }
        // NEEDS_RESET is the device's to set; keep it until the driver resets.
        self.common.status = status | (self.common.status & STATUS_DEVICE_NEEDS_RESET);
    }

    fn activate(&mut self) {
        let queues: Vec<ActiveQueue<'_>> = self
            .common
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(index, q)| ActiveQueue {
                // Below MAX_QUEUES.
                index: index as u16,
                config: q.config,
                kick: &self.kicks[index],
                call: &self.calls[index],
            })
            .collect();
        let features = self.common.driver_features;
        match self.device.activate(features, &queues) {
            Ok(()) => {
                self.active = true;
                log::info!("{}: running ({} queues)", self.device.name(), queues.len());
            }
            Err(error) => {
                log::error!(
                    "{}: cannot start: {error}; the device is marked failed",
                    self.device.name()
                );
                self.mark_failed();
            }
        }
    }

    /// The device hit an error it cannot recover from on its own (e.g. its backend hung up).
    /// A device being reset (status 0) stays at 0: the driver polls for that after a reset.
    pub fn mark_failed(&mut self) {
        if self.common.status != 0 {
            self.common.status |= STATUS_DEVICE_NEEDS_RESET;
        }
    }
}

/// A `struct virtio_pci_cap` body after the ID and next-pointer bytes: cap_len, cfg_type, bar,
/// id, padding, offset, length.
fn virtio_cap(kind: u8, offset: u64, len: u64) -> [u8; 14] {
    let mut body = [0u8; 14];
    body[0] = 16;
    body[1] = kind;
    // Offsets and lengths are the BAR layout constants, all below 4 GiB.
    body[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
    body[10..14].copy_from_slice(&(len as u32).to_le_bytes());
    body
}

/// The PCI class the device type implies (what QEMU reports, so guest tools recognise it).
fn pci_class(device_type: u16) -> (u8, u8, u8) {
    match device_type {
        // Mass storage, other.
        super::VIRTIO_ID_BLOCK => (0x01, 0x80, 0x00),
        // Network, Ethernet.
        super::VIRTIO_ID_NET => (0x02, 0x00, 0x00),
        _ => (0xff, 0x00, 0x00),
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        // Message control is the upper half of the capability's first dword.
        let mut control = [0u8; 2];
        self.config.read(self.msix_capability + 2, &mut control);
        let change = self.msix.set_control(u16::from_le_bytes(control));
        if change != MsixChange::None {
            self.sync_interrupts(change);
        }
        self.sync_ioevents();
    }

    fn bar0(&self) -> Option<(u64, u64)> {
        if self.config.command() & COMMAND_MEMORY_SPACE == 0 {
            return None;
        }
        self.config.bar0()
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => {
                if self.device.failed() {
                    self.mark_failed();
                }
                self.common.read(o, data)
            }
            // Interrupts are MSI-X only: the ISR never has a bit set.
            o if (ISR_OFFSET..ISR_OFFSET + 0x1000).contains(&o) => data.fill(0),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => match self.common.write(o, data) {
                CommonWrite::Nothing => {}
                CommonWrite::Status(status) => self.set_status(status),
                CommonWrite::Vectors => self.sync_interrupts(MsixChange::None),
            },
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                // Only reached when the ioeventfd is not registered: forward the kick.
                let index = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(kick) = usize::try_from(index).ok().and_then(|i| self.kicks.get(i)) {
                    let _ = kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_size()).contains(&o) => {
                let change = self.msix.write_table(o - MSIX_TABLE_OFFSET, data);
                if change != MsixChange::None {
                    self.sync_interrupts(change);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
