//! The virtio-net header (`virtio_net_hdr_v1`, 12 bytes with VERSION_1 or MRG_RXBUF) and the
//! device config space (`struct virtio_net_config` up to `mtu`).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
};

/// The header length with VERSION_1 (what this frontend always negotiates).
pub const HDR_LEN: usize = 12;
/// Bytes of config space read: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_SIZE: u32 = 12;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHeader {
    /// A plain frame: no offloads.
    pub fn plain() -> Self {
        Self::default()
    }

    /// Asks the device to finish the L4 checksum at `start + offset`.
    pub fn needs_csum(start: u16, offset: u16) -> Self {
        NetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            csum_start: start,
            csum_offset: offset,
            ..Self::default()
        }
    }

    /// A TCPv4 GSO frame with L4 checksum offload (checksum at `csum_start + 16`).
    pub fn tso4(hdr_len: u16, gso_size: u16, csum_start: u16) -> Self {
        NetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            hdr_len,
            gso_size,
            csum_start,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    pub fn is_gso(&self) -> bool {
        u32::from(self.gso_type) != VIRTIO_NET_HDR_GSO_NONE
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Parses the first 12 bytes of `b` (`None` when shorter).
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..HDR_LEN)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

impl NetConfig {
    pub fn parse(raw: &[u8]) -> Option<Self> {
        let raw = raw.get(..CONFIG_SIZE as usize)?;
        let le = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        Some(NetConfig {
            mac: raw[..6].try_into().ok()?,
            status: le(6),
            max_virtqueue_pairs: le(8),
            mtu: le(10),
        })
    }
}
