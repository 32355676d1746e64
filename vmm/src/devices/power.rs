//! The ACPI sleep-control / reset register of our hardware-reduced ACPI platform (the FADT
//! points at it), which turns the guest's ACPI power-off and reset into VM exits.

use std::sync::mpsc::Sender;

use crate::boot::acpi::{decode_sleep_control, SleepRequest, ACPI_RESET_VALUE};
use crate::bus::BusDevice;
use crate::vm::VmEvent;

use super::GuestExit;

pub struct AcpiPowerDevice {
    events: Sender<VmEvent>,
}

impl AcpiPowerDevice {
    pub fn new(events: Sender<VmEvent>) -> Self {
        AcpiPowerDevice { events }
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep, nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        let exit = if value == ACPI_RESET_VALUE {
            log::info!("the guest wrote the ACPI reset register");
            Some(GuestExit::Reset)
        } else {
            decode_sleep_control(value).map(|SleepRequest::PowerOff| GuestExit::PowerOff)
        };
        if let Some(exit) = exit {
            // The receiver lives as long as the VM; if it is gone the VMM is exiting anyway.
            let _ = self.events.send(VmEvent::Exit(exit));
        }
    }
}
