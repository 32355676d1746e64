//! A virtio-blk device served by a vhost-user backend (`splitvmm-blk`, qemu-storage-daemon, …):
//! what the guest sees of it. The feature bits offered are the backend's, narrowed to what this
//! transport supports, plus read-only and multi-queue as configured; the config space is the
//! backend's, read once with GET_CONFIG, with `num_queues` set to what the VMM announces.

use super::device::{DeviceShape, LinkSetup, VhostUserDevice};
use super::frontend::{Requirements, VhostUserError};
use super::link::Replay;
use super::reconnect;
use crate::config::DiskConfig;
use crate::memory::GuestRam;
use crate::virtio::{
    VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// `struct virtio_blk_config` up to and including the write-zeroes fields (virtio 1.2, 5.2.4).
pub const BLK_CONFIG_SIZE: u32 = 60;
/// Offset of `num_queues` in the config space.
const CONFIG_NUM_QUEUES: usize = 34;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_MQ: u32 = 12;
/// Device-specific feature bits are 0-23; the backend decides which of those it offers.
const DEVICE_SPECIFIC_FEATURES: u64 = (1 << 24) - 1;

/// Connects to the backend of disk `index` and reads its config space; nothing of the guest is
/// handed over until the driver starts the device.
pub fn connect(
    index: usize,
    disk: &DiskConfig,
    ram: &GuestRam,
) -> Result<VhostUserDevice, VhostUserError> {
    let name = format!("disk {index} ({})", disk.socket.display());
    let needs = Requirements {
        num_queues: disk.num_queues,
        config: true,
    };
    let mut connection = reconnect::connect(&name, &disk.socket, needs, disk.link.wait)?;
    let offered = connection.backend_features();
    if disk.num_queues > 1 && offered & (1 << VIRTIO_BLK_F_MQ) == 0 {
        return Err(VhostUserError::MissingFeature {
            path: disk.socket.clone(),
            feature: "VIRTIO_BLK_F_MQ",
            why: "num_queues above 1 needs",
        });
    }
    // get_config checked the reply is BLK_CONFIG_SIZE (60) bytes, so the slice is in bounds.
    let mut config_space = connection.get_config(BLK_CONFIG_SIZE)?;
    config_space[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2]
        .copy_from_slice(&disk.num_queues.to_le_bytes());
    let shape = DeviceShape {
        name,
        device_type: VIRTIO_ID_BLOCK,
        num_queues: disk.num_queues,
        queue_size: disk.queue_size,
        features: guest_features(offered, disk),
        config_space,
        enabled_at_start: disk.num_queues,
    };
    // A disk must not lose a request across a backend restart: see link::replay_verdict.
    let setup = LinkSetup {
        needs,
        replay: Replay::EveryRequest,
        options: disk.link,
    };
    VhostUserDevice::new(shape, connection, setup, ram)
}

/// The features offered to the guest: the backend's device-specific bits and the ring and
/// version bits this transport supports; read-only when configured; multi-queue only when
/// more than one queue is configured.
pub fn guest_features(backend: u64, disk: &DiskConfig) -> u64 {
    let transport = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX);
    let mut features = backend & (DEVICE_SPECIFIC_FEATURES | transport);
    if disk.readonly {
        features |= 1 << VIRTIO_BLK_F_RO;
    }
    if disk.num_queues <= 1 {
        features &= !(1 << VIRTIO_BLK_F_MQ);
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn disk(num_queues: u16, readonly: bool) -> DiskConfig {
        DiskConfig {
            socket: PathBuf::from("/run/blk.sock"),
            num_queues,
            queue_size: 256,
            readonly,
            link: Default::default(),
        }
    }

    #[test]
    fn guest_features_narrow_the_backends() {
        // What splitvmm-blk offers: VERSION_1, EVENT_IDX, INDIRECT_DESC, SEG_MAX, BLK_SIZE,
        // FLUSH, MQ, DISCARD, WRITE_ZEROES, PROTOCOL_FEATURES, plus a bit we do not support
        // (RING_PACKED, 34).
        let backend: u64 = (1 << 32)
            | (1 << 29)
            | (1 << 28)
            | (1 << 2)
            | (1 << 6)
            | (1 << 9)
            | (1 << 12)
            | (1 << 13)
            | (1 << 14)
            | (1 << 30)
            | (1 << 34);
        let one = guest_features(backend, &disk(1, false));
        assert_eq!(one & (1 << 30), 0, "PROTOCOL_FEATURES is not the guest's");
        assert_eq!(one & (1 << 34), 0, "packed rings are not offered");
        assert_eq!(one & (1 << VIRTIO_BLK_F_MQ), 0, "one queue: no MQ");
        assert_ne!(one & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(one & (1 << 13), 0, "discard passes through");
        let two = guest_features(backend, &disk(2, true));
        assert_ne!(two & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(two & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
