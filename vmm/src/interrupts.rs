//! The VM's KVM interrupt routing table: the default routes of the in-kernel PIC and IOAPIC
//! plus one MSI route per allocated GSI that a device has programmed.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so it lives in one place and every change
//! rewrites it. Devices attach their eventfds to these GSIs as irqfds; an MSI-X vector's
//! message then reaches the guest straight from whoever signals the eventfd.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use thiserror::Error;

use crate::pci::msix::MsiMessage;

/// GSIs 0-23 are the IOAPIC's pins (0-15 also the PICs'); MSI routes start above them.
pub const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on GSI numbers (KVM_MAX_IRQ_ROUTES).
const MAX_GSI: u32 = 4096;
const IOAPIC_PINS: u32 = 24;

#[derive(Debug, Error)]
pub enum InterruptError {
    #[error("no room for {0} more interrupt routes (KVM allows {MAX_GSI} GSIs)")]
    OutOfGsis(u16),
    #[error("cannot build the interrupt routing table: {0}")]
    Table(String),
    #[error("cannot set KVM's interrupt routing table: {0}")]
    SetRouting(kvm_ioctls::Error),
}

#[derive(Debug, Default)]
struct Routes {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

/// The routing table, shared by every device that has MSI-X.
pub struct InterruptRoutes {
    vm: Arc<VmFd>,
    routes: Mutex<Routes>,
}

impl InterruptRoutes {
    pub fn new(vm: Arc<VmFd>) -> Self {
        InterruptRoutes {
            vm,
            routes: Mutex::new(Routes {
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            }),
        }
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        // The map is consistent after every statement that changes it.
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `count` consecutive GSIs and returns the first.
    pub fn allocate(&self, count: u16) -> Result<u32, InterruptError> {
        let mut routes = self.lock();
        let first = routes.next_gsi;
        let end = first + u32::from(count);
        if end > MAX_GSI {
            return Err(InterruptError::OutOfGsis(count));
        }
        routes.next_gsi = end;
        Ok(first)
    }

    /// Routes each GSI to its message (`None` removes the route) and rewrites KVM's table.
    pub fn update(&self, changes: &[(u32, Option<MsiMessage>)]) -> Result<(), InterruptError> {
        let mut routes = self.lock();
        for &(gsi, message) in changes {
            match message {
                Some(message) => routes.msi.insert(gsi, message),
                None => routes.msi.remove(&gsi),
            };
        }
        let entries = routing_entries(&routes.msi);
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|error| InterruptError::Table(format!("{error:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(InterruptError::SetRouting)
    }
}

/// KVM's default routes (what it sets up with the irqchip) followed by the MSI routes.
fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    };
    let mut entries = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, message) in msi {
        entries.push(kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    // Truncation intended: the two halves of the address.
                    address_lo: message.address as u32,
                    address_hi: (message.address >> 32) as u32,
                    data: message.data,
                    ..Default::default()
                },
            },
            ..Default::default()
        });
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keeps_the_default_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x41,
            },
        );
        let entries = routing_entries(&msi);
        // 16 PIC pins + 24 IOAPIC pins + 1 MSI.
        assert_eq!(entries.len(), 16 + 24 + 1);
        let last = entries[entries.len() - 1];
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built with its `msi` member.
        let route = unsafe { last.u.msi };
        assert_eq!(
            (route.address_lo, route.address_hi, route.data),
            (0xfee0_1000, 1, 0x41)
        );
        let pin9: Vec<_> = entries.iter().filter(|e| e.gsi == 9).collect();
        assert_eq!(pin9.len(), 2);
        // SAFETY: irqchip entries were built with their `irqchip` member.
        let slave = unsafe { pin9[0].u.irqchip };
        assert_eq!((slave.irqchip, slave.pin), (KVM_IRQCHIP_PIC_SLAVE, 1));
    }
}
