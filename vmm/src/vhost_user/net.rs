//! A virtio-net NIC served by a vhost-user backend (`splitvmm-net`, or any other): what the
//! guest sees of it. Queues 2n and 2n+1 are pair n's receive and transmit queues, served by
//! the backend. With more than one pair there is a control queue after them, served by the VMM
//! ([`super::net_ctrl`]), and VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_MQ are offered; the other
//! control-queue features (RX mode and VLAN filters, MAC setting, announcements, offload
//! control) never are. The rest of the backend's device bits pass through. The config space is
//! the backend's (GET_CONFIG), with the MAC replaced when `mac=` is given and
//! `max_virtqueue_pairs` set to what the VMM announces.

use super::device::{DeviceShape, LinkSetup, VhostUserDevice};
use super::frontend::{Requirements, VhostUserError};
use super::link::Replay;
use super::net_ctrl::{ControlQueue, ControlQueueSetup};
use super::reconnect;
use crate::config::NetConfig;
use crate::memory::GuestRam;
use crate::virtio::{
    ActiveQueue, DeviceError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_ID_NET,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// `struct virtio_net_config` up to `mtu`: `mac[6]`, status, max_virtqueue_pairs, mtu.
pub const NET_CONFIG_SIZE: u32 = 12;
const CONFIG_MAX_PAIRS: usize = 8;
const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: u32 = 2;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
const VIRTIO_NET_F_CTRL_RX: u32 = 18;
const VIRTIO_NET_F_CTRL_VLAN: u32 = 19;
const VIRTIO_NET_F_GUEST_ANNOUNCE: u32 = 21;
const VIRTIO_NET_F_MQ: u32 = 22;
const VIRTIO_NET_F_CTRL_MAC_ADDR: u32 = 23;
const DEVICE_SPECIFIC_FEATURES: u64 = (1 << 24) - 1;
/// Features that only work through a control queue, which the VMM does not have yet.
const NEEDS_CONTROL_QUEUE: u64 = (1 << VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | (1 << VIRTIO_NET_F_CTRL_VQ)
    | (1 << VIRTIO_NET_F_CTRL_RX)
    | (1 << VIRTIO_NET_F_CTRL_VLAN)
    | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
    | (1 << VIRTIO_NET_F_MQ)
    | (1 << VIRTIO_NET_F_CTRL_MAC_ADDR);

/// A NIC: the backend's rings, and the control queue when there is one.
pub struct VhostUserNet {
    inner: VhostUserDevice,
    pairs: u16,
    control: Option<ControlQueue>,
}

/// Connects to the backend of NIC `index` and reads its config space.
pub fn connect(
    index: usize,
    nic: &NetConfig,
    ram: &GuestRam,
) -> Result<VhostUserNet, VhostUserError> {
    let num_queues = 2 * nic.num_queue_pairs;
    let name = format!("nic {index} ({})", nic.socket.display());
    let needs = Requirements {
        num_queues,
        config: true,
    };
    let mut connection = reconnect::connect(&name, &nic.socket, needs, nic.link.wait)?;
    let offered = connection.backend_features();
    if nic.num_queue_pairs > 1 && offered & (1 << VIRTIO_NET_F_MQ) == 0 {
        return Err(VhostUserError::MissingFeature {
            path: nic.socket.clone(),
            feature: "VIRTIO_NET_F_MQ",
            why: "num_queue_pairs above 1 needs",
        });
    }
    // get_config checked the reply is NET_CONFIG_SIZE (12) bytes, so the slices are in bounds.
    let mut config_space = connection.get_config(NET_CONFIG_SIZE)?;
    if let Some(mac) = nic.mac {
        config_space[..6].copy_from_slice(&mac);
    }
    config_space[CONFIG_MAX_PAIRS..CONFIG_MAX_PAIRS + 2]
        .copy_from_slice(&nic.num_queue_pairs.to_le_bytes());
    let shape = DeviceShape {
        name,
        device_type: VIRTIO_ID_NET,
        num_queues,
        queue_size: nic.queue_size,
        features: guest_features(offered, nic),
        config_space,
        // The first pair runs from the start; the driver enables the others through the
        // control queue (virtio 1.2, 5.1.6.5.5).
        enabled_at_start: 2,
    };
    Ok(VhostUserNet {
        // Packets lost across a backend restart are the network's ordinary losses.
        inner: VhostUserDevice::new(
            shape,
            connection,
            LinkSetup {
                needs,
                replay: Replay::LossTolerated,
                options: nic.link,
            },
            ram,
        )?,
        pairs: nic.num_queue_pairs,
        control: None,
    })
}

/// The backend's device-specific bits without those that need a control queue, the ring and
/// version bits this transport supports, and VIRTIO_NET_F_MAC when the VMM sets the MAC.
pub fn guest_features(backend: u64, nic: &NetConfig) -> u64 {
    let transport = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX);
    let mut features = backend & (DEVICE_SPECIFIC_FEATURES | transport) & !NEEDS_CONTROL_QUEUE;
    if nic.mac.is_some() {
        features |= 1 << VIRTIO_NET_F_MAC;
    }
    if nic.num_queue_pairs > 1 {
        features |= (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
    }
    features
}

impl VirtioDevice for VhostUserNet {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn num_queues(&self) -> u16 {
        // The control queue comes after the data queues.
        self.inner.num_queues() + u16::from(self.pairs > 1)
    }

    fn queue_max_size(&self) -> u16 {
        self.inner.queue_max_size()
    }

    fn device_features(&self) -> u64 {
        self.inner.device_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.write_config(offset, data)
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), DeviceError> {
        let data_queues = self.inner.num_queues();
        let (data, control): (Vec<ActiveQueue<'_>>, Vec<_>) =
            queues.iter().copied().partition(|q| q.index < data_queues);
        self.inner.activate(features, &data)?;
        if let Some(queue) = control.first() {
            let clone = |fd: &vmm_sys_util::eventfd::EventFd| {
                fd.try_clone()
                    .map_err(|error| DeviceError(format!("control queue eventfd: {error}")))
            };
            let setup = ControlQueueSetup {
                name: self.inner.name().to_owned(),
                config: queue.config,
                event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
                memory: self.inner.memory().clone(),
                kick: clone(queue.kick)?,
                call: clone(queue.call)?,
                link: self.inner.link(),
                max_pairs: self.pairs,
            };
            let control = ControlQueue::start(setup)
                .map_err(|error| DeviceError(format!("control queue: {error}")))?;
            self.control = Some(control);
        }
        Ok(())
    }

    fn reset(&mut self) {
        // The control queue stops first: it must not enable rings being torn down.
        self.control = None;
        self.inner.reset();
    }

    fn failed(&self) -> bool {
        self.inner.failed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn no_control_queue_features_reach_the_guest() {
        let nic = |mac| NetConfig {
            socket: PathBuf::from("/run/net.sock"),
            mac,
            num_queue_pairs: 1,
            queue_size: 256,
            link: Default::default(),
        };
        // splitvmm-net's offer: VERSION_1, MAC, STATUS(16), MTU(3), MRG_RXBUF(15), CSUM(0),
        // GUEST_CSUM(1), TSO bits, MQ, EVENT_IDX, PROTOCOL_FEATURES; and CTRL_VQ for the test.
        let backend: u64 = (1 << 32)
            | (1 << 5)
            | (1 << 16)
            | (1 << 3)
            | (1 << 15)
            | 0b11
            | (1 << 7)
            | (1 << 8)
            | (1 << 11)
            | (1 << 12)
            | (1 << 22)
            | (1 << 29)
            | (1 << 30)
            | (1 << 17);
        let features = guest_features(backend, &nic(None));
        assert_eq!(features & NEEDS_CONTROL_QUEUE, 0);
        assert_eq!(features & (1 << 30), 0);
        assert_ne!(features & (1 << 15), 0, "MRG_RXBUF passes through");
        assert_ne!(features & (1 << 32), 0);
        let without_mac = backend & !(1 << VIRTIO_NET_F_MAC);
        let features = guest_features(without_mac, &nic(Some([0x52, 0, 0, 0, 0, 1])));
        assert_ne!(
            features & (1 << VIRTIO_NET_F_MAC),
            0,
            "the VMM's MAC is offered"
        );
    }
}
