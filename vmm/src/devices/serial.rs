//! The COM1 16550 UART (vm-superio) at 0x3f8/IRQ 4: the guest console. Output goes to the
//! VMM's stdout; a thread feeds the VMM's stdin into the receive FIFO.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt through an eventfd registered with KVM as an irqfd.
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole {
    uart: Serial<IrqfdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(interrupt: EventFd, output: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(IrqfdTrigger(interrupt), output),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(register), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(register);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(register), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(error) = self.uart.write(register, value) {
                log::warn!("serial console: {error:?}");
            }
        }
    }
}

/// Copies `input` (normally the VMM's stdin) into the UART until it ends.
pub fn spawn_input_forwarder(
    console: Arc<Mutex<SerialConsole>>,
    mut input: Box<dyn Read + Send>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut buffer = [0u8; 64];
            loop {
                let count = match input.read(&mut buffer) {
                    Ok(0) | Err(_) => return,
                    Ok(count) => count,
                };
                let mut pending = &buffer[..count];
                while !pending.is_empty() {
                    let accepted = console
                        .lock()
                        .map(|mut c| c.uart.enqueue_raw_bytes(pending))
                        .unwrap_or(Ok(pending.len()));
                    match accepted {
                        Ok(taken) => pending = &pending[taken..],
                        // The guest has not drained its FIFO yet: a person is typing faster
                        // than the guest reads, so waiting a little loses nothing.
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }
        })
        .map(|_| ())
}
