//! Virtio devices as the guest sees them. The transport ([`pci`]) is the VMM's own; what is
//! behind it (feature bits, config space, the vrings) belongs to a [`VirtioDevice`], which for
//! splitvmm is always a vhost-user frontend handing the rings to a backend process.

mod common_cfg;
pub mod pci;

use vmm_sys_util::eventfd::EventFd;

/// Virtio device IDs (virtio 1.2, 5).
pub const VIRTIO_ID_NET: u16 = 1;
pub const VIRTIO_ID_BLOCK: u16 = 2;

/// Feature bits the transport itself cares about.
pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// One virtqueue as the driver set it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub size: u16,
    /// Guest-physical addresses of the descriptor table, driver (avail) and device (used) areas.
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// What a device gets when the driver sets DRIVER_OK: each enabled queue with the eventfd the
/// guest's kicks land in (a KVM ioeventfd) and the one that interrupts the guest (a KVM irqfd
/// on the queue's MSI-X vector).
#[derive(Clone, Copy)]
pub struct ActiveQueue<'a> {
    pub index: u16,
    pub config: QueueConfig,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

/// Why a device could not start or stop.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

/// The device behind a virtio transport.
pub trait VirtioDevice: Send {
    /// For log lines, e.g. `disk 0 (/run/blk.sock)`.
    fn name(&self) -> &str;
    fn device_type(&self) -> u16;
    fn num_queues(&self) -> u16;
    fn queue_max_size(&self) -> u16;
    /// The feature bits offered to the driver.
    fn device_features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with `features` acked: start the queues.
    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), DeviceError>;
    /// The driver reset the device: stop whatever runs.
    fn reset(&mut self);
    /// The device broke on its own (e.g. its backend hung up) and needs the driver to reset it.
    fn failed(&self) -> bool {
        false
    }
}
