//! splitvmm: a split-process VMM. This crate is the core VMM: CPU and memory virtualization
//! through KVM, the few platform devices a kernel needs, a PCI bus with virtio-pci devices, and
//! the vhost-user frontends that hand each of those devices to a backend process.

pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod interrupts;
pub mod memory;
pub mod pci;
pub mod terminal;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio;
pub mod vm;

pub use config::{Args, VmConfig};
pub use devices::GuestExit;

/// Exit status when the guest powered off.
pub const EXIT_POWER_OFF: i32 = 0;
/// Exit status when the VMM itself failed.
pub const EXIT_VMM_ERROR: i32 = 1;
/// Exit status for bad command-line input.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when the guest reset (i8042 reset line, ACPI reset register, triple fault).
pub const EXIT_RESET: i32 = 3;

/// The process exit status for how the guest ended.
pub fn exit_code(exit: GuestExit) -> i32 {
    match exit {
        GuestExit::PowerOff => EXIT_POWER_OFF,
        GuestExit::Reset => EXIT_RESET,
    }
}
