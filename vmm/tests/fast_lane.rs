//! The fast lane: tiny real-mode guests run natively on this host's /dev/kvm (even under PVM,
//! which emulates only CPL-0 protected/long mode), exercising the vCPU threads, the port-I/O
//! bus, the UART and every way a guest can end, without booting a kernel.

use std::io::{Cursor, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use splitvmm_vmm::boot::acpi::{ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_SLEEP_CONTROL_PORT};
use splitvmm_vmm::vm::{run_machine, Console, Machine, Payload, VmError};
use splitvmm_vmm::GuestExit;

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Clone, Default)]
struct SharedOutput(Arc<Mutex<Vec<u8>>>);

impl Write for SharedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedOutput {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Runs `code` as a real-mode guest with `vcpus` vCPUs and `input` on its console; returns how
/// it ended and what it printed. Fails the test, with the console, if it does not end in time.
fn run_real_mode(code: Vec<u8>, vcpus: u8, input: &[u8]) -> (Result<GuestExit, VmError>, String) {
    let output = SharedOutput::default();
    let console = Console {
        output: Box::new(output.clone()),
        input: Some(Box::new(Cursor::new(input.to_vec()))),
        raw_terminal: false,
    };
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let machine = Machine {
            memory_bytes: 128 << 20,
            vcpus,
        };
        let _ = done.send(run_machine(machine, Payload::RealMode(&code), console));
    });
    match finished.recv_timeout(DEADLINE) {
        Ok(result) => (result, output.text()),
        Err(_) => panic!(
            "real-mode guest did not end within {DEADLINE:?}; console so far: {:?}",
            output.text()
        ),
    }
}

/// `mov dx, port`
fn mov_dx(port: u16) -> Vec<u8> {
    let [low, high] = port.to_le_bytes();
    vec![0xba, low, high]
}

/// Writes each byte of `text` to COM1's data register.
fn print(text: &[u8]) -> Vec<u8> {
    let mut code = mov_dx(0x3f8);
    for &byte in text {
        code.extend([0xb0, byte, 0xee]); // mov al, byte; out dx, al
    }
    code
}

/// ACPI S5 through the sleep-control register, then halt forever (never reached).
fn power_off() -> Vec<u8> {
    let mut code = mov_dx(ACPI_SLEEP_CONTROL_PORT);
    let sleep_enable = (ACPI_S5_SLP_TYP << 2) | (1 << 5);
    code.extend([0xb0, sleep_enable, 0xee, 0xf4, 0xeb, 0xfe]);
    code
}

#[test]
fn prints_on_the_uart_and_powers_off() {
    let mut code = print(b"hello from real mode\n");
    code.extend(power_off());
    let (result, console) = run_real_mode(code, 1, b"");
    assert_eq!(result.unwrap(), GuestExit::PowerOff, "console: {console:?}");
    assert_eq!(console, "hello from real mode\n");
}

#[test]
fn echoes_console_input_through_the_uart() {
    // Polls the line status register, reads each byte, prints byte + 1, stops at '.'.
    let mut code = vec![
        0xba, 0xfd, 0x03, // 0: mov dx, 0x3fd (LSR)
        0xec, // 3: in al, dx
        0xa8, 0x01, // 4: test al, 1 (data ready)
        0x74, 0xf8, // 6: jz 0
        0xba, 0xf8, 0x03, // 8: mov dx, 0x3f8
        0xec, // 11: in al, dx
        0x3c, b'.', // 12: cmp al, '.'
        0x74, 0x05, // 14: je 21
        0xfe, 0xc0, // 16: inc al
        0xee, // 18: out dx, al
        0xeb, 0xeb, // 19: jmp 0
    ];
    code.extend(power_off()); // 21
    let (result, console) = run_real_mode(code, 1, b"HAL.");
    assert_eq!(result.unwrap(), GuestExit::PowerOff, "console: {console:?}");
    assert_eq!(console, "IBM");
}

#[test]
fn i8042_reset_line_resets() {
    let mut code = print(b"r");
    code.extend([0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfe]); // out 0x64, 0xfe
    let (result, console) = run_real_mode(code, 1, b"");
    assert_eq!(result.unwrap(), GuestExit::Reset, "console: {console:?}");
    assert_eq!(console, "r");
}

#[test]
fn acpi_reset_register_resets() {
    let mut code = mov_dx(ACPI_SLEEP_CONTROL_PORT);
    code.extend([0xb0, ACPI_RESET_VALUE, 0xee, 0xf4, 0xeb, 0xfe]);
    let (result, _) = run_real_mode(code, 1, b"");
    assert_eq!(result.unwrap(), GuestExit::Reset);
}

#[test]
fn unrelated_sleep_control_writes_do_not_end_the_guest() {
    // SLP_TYP = S5 without SLP_EN, then S1 with SLP_EN: neither powers off; then print.
    let mut code = mov_dx(ACPI_SLEEP_CONTROL_PORT);
    code.extend([0xb0, ACPI_S5_SLP_TYP << 2, 0xee]);
    code.extend([0xb0, (1 << 2) | (1 << 5), 0xee]);
    code.extend(print(b"still here"));
    code.extend(power_off());
    let (result, console) = run_real_mode(code, 1, b"");
    assert_eq!(result.unwrap(), GuestExit::PowerOff);
    assert_eq!(console, "still here");
}

#[test]
fn unclaimed_ports_read_as_all_ones() {
    let mut code = vec![0xe4, 0x99]; // in al, 0x99 (nothing there)
    code.extend(mov_dx(0x3f8));
    code.push(0xee); // out dx, al
    code.extend(power_off());
    let (result, console) = run_real_mode(code, 1, b"");
    assert_eq!(result.unwrap(), GuestExit::PowerOff);
    assert_eq!(
        console.as_bytes(),
        "\u{fffd}".as_bytes(),
        "expected one 0xff byte"
    );
}

#[test]
fn power_off_stops_application_processors_too() {
    // vCPUs 1..3 sit in wait-for-SIPI inside KVM_RUN; the VM must still stop and return.
    let mut code = print(b"bsp");
    code.extend(power_off());
    let (result, console) = run_real_mode(code, 4, b"");
    assert_eq!(result.unwrap(), GuestExit::PowerOff);
    assert_eq!(console, "bsp");
}
