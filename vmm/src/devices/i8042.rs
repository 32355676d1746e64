//! Just enough of the i8042 keyboard controller for its CPU reset line (command 0xfe on port
//! 0x64), which is how Linux reboots with `reboot=k`. There is no keyboard behind it.

use std::sync::mpsc::Sender;

use crate::bus::BusDevice;
use crate::vm::VmEvent;

use super::GuestExit;

/// Base of the controller's ports (data at 0x60, command/status at 0x64).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_PULSE_RESET: u8 = 0xfe;

pub struct I8042 {
    events: Sender<VmEvent>,
}

impl I8042 {
    pub fn new(events: Sender<VmEvent>) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_PULSE_RESET) {
            log::info!("the guest pulsed the i8042 reset line");
            // The receiver lives as long as the VM; if it is gone the VMM is exiting anyway.
            let _ = self.events.send(VmEvent::Exit(GuestExit::Reset));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_reset() {
        let (sender, receiver) = std::sync::mpsc::channel();
        let mut controller = I8042::new(sender);
        controller.write(0, &[CMD_PULSE_RESET]);
        controller.write(COMMAND_OFFSET, &[0xaa]);
        assert!(receiver.try_recv().is_err());
        controller.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert!(matches!(
            receiver.try_recv(),
            Ok(VmEvent::Exit(GuestExit::Reset))
        ));
    }
}
