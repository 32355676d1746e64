//! The platform devices the VMM emulates itself: only what a kernel needs to boot, talk on a
//! console and end. Every other device is a vhost-user backend in another process.

pub mod i8042;
pub mod power;
pub mod serial;

/// How the guest asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    Reset,
}
