//! What the device looks like to the driver: the virtio feature set, the vhost-user protocol
//! features, `struct virtio_net_config`, the virtio-net header size, and which tap offloads
//! the negotiated features allow.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// `struct virtio_net_config` up to `mtu`: mac[6], status, max_virtqueue_pairs, mtu (all
/// little-endian with VERSION_1).
pub const CONFIG_SIZE: usize = 12;

/// The header with VERSION_1 or MRG_RXBUF (`virtio_net_hdr_mrg_rxbuf` / `virtio_net_hdr_v1`).
pub const HDR_LEN: usize = 12;
/// The legacy header without MRG_RXBUF (`struct virtio_net_hdr`).
pub const LEGACY_HDR_LEN: usize = 10;

/// The virtio features offered.
pub fn device_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_MQ,
        VIRTIO_RING_F_EVENT_IDX,
    ]
    .iter()
    .fold(
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        |acc, bit| acc | 1u64 << bit,
    )
}

/// The vhost-user protocol features offered.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

pub fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The virtio-net header length for the acked features.
pub fn header_len(acked: u64) -> usize {
    if has(acked, VIRTIO_F_VERSION_1) || has(acked, VIRTIO_NET_F_MRG_RXBUF) {
        HDR_LEN
    } else {
        LEGACY_HDR_LEN
    }
}

/// TUNSETOFFLOAD flags for what the driver accepts on RX: checksum offload only with
/// GUEST_CSUM, segmentation offloads only on top of it (the tap requires TUN_F_CSUM for them).
pub fn tap_offloads(acked: u64) -> u32 {
    if !has(acked, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(acked, VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(acked, VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

/// The config space bytes.
pub fn config_space(mac: &[u8; 6], num_queue_pairs: u16, mtu: u16) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    c[..6].copy_from_slice(mac);
    // The link is always reported up: a missing tap drops frames but does not bounce the
    // guest's link (it could not be told reliably without a config-change interrupt anyway).
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&num_queue_pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

/// `size` bytes of the config space from `offset`; out-of-range reads return nothing (the
/// crate then answers the frontend with an empty payload, which it reports as an error).
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = offset as usize;
    match start.checked_add(size as usize) {
        Some(end) if end <= space.len() => space[start..end].to_vec(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout() {
        let c = config_space(&[2, 3, 4, 5, 6, 7], 3, 9000);
        assert_eq!(&c[..6], &[2, 3, 4, 5, 6, 7]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 3);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
        assert_eq!(read_config(&c, 6, 2), vec![1, 0]);
        assert!(read_config(&c, 10, 4).is_empty());
        assert!(read_config(&c, u32::MAX, 2).is_empty());
    }

    #[test]
    fn offloads_follow_guest_features() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |a, b| a | 1 << b);
        assert_eq!(tap_offloads(f(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(
            tap_offloads(f(&[VIRTIO_NET_F_GUEST_CSUM])),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tap_offloads(f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6
            ])),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        assert_eq!(header_len(0), LEGACY_HDR_LEN);
        assert_eq!(header_len(f(&[VIRTIO_F_VERSION_1])), HDR_LEN);
        assert_eq!(header_len(f(&[VIRTIO_NET_F_MRG_RXBUF])), HDR_LEN);
    }
}
