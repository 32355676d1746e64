//! Validation of what the guest transmits: the virtio-net header against the negotiated
//! features and the frame length against the MTU. Everything here is guest input; a frame
//! that fails is dropped and counted by the caller, never passed to the tap half-checked.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

use crate::device::{has, header_len};

/// Ethernet header.
pub const ETH_HLEN: usize = 14;
/// An 802.1Q tag a frame may carry on top of the MTU.
pub const VLAN_HLEN: usize = 4;
/// The largest frame (without the virtio-net header) any driver may send or receive: a 64 KiB
/// GSO packet with its Ethernet and VLAN headers (the spec's 65562-byte buffer less the
/// 12-byte header).
pub const MAX_FRAME: usize = 65550;

/// Why a TX frame is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxDrop {
    Malformed(String),
    Oversized { len: usize, max: usize },
}

impl std::fmt::Display for TxDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxDrop::Malformed(why) => write!(f, "malformed: {why}"),
            TxDrop::Oversized { len, max } => {
                write!(f, "oversized: {len}-byte frame, at most {max} allowed")
            }
        }
    }
}

/// What TX frames may be, from the acked features and the MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRules {
    pub hdr_len: usize,
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    /// Longest frame without GSO (MTU + Ethernet + VLAN header).
    pub max_plain: usize,
}

impl TxRules {
    pub fn new(acked: u64, mtu: u16) -> Self {
        TxRules {
            hdr_len: header_len(acked),
            csum: has(acked, VIRTIO_NET_F_CSUM),
            tso4: has(acked, VIRTIO_NET_F_HOST_TSO4),
            tso6: has(acked, VIRTIO_NET_F_HOST_TSO6),
            max_plain: usize::from(mtu) + ETH_HLEN + VLAN_HLEN,
        }
    }
}

/// Checks a TX frame: `hdr` is its virtio-net header (`rules.hdr_len` bytes), `frame_len` the
/// length of what follows it.
pub fn check_tx(hdr: &[u8], frame_len: usize, rules: &TxRules) -> Result<(), TxDrop> {
    if hdr.len() < 10 {
        return Err(TxDrop::Malformed(format!(
            "{}-byte chain is shorter than the virtio-net header",
            hdr.len()
        )));
    }
    if frame_len < ETH_HLEN {
        return Err(TxDrop::Malformed(format!(
            "{frame_len}-byte frame is shorter than an Ethernet header"
        )));
    }
    let flags = u32::from(hdr[0]);
    let gso_type = u32::from(hdr[1]);
    let le = |at: usize| usize::from(u16::from_le_bytes([hdr[at], hdr[at + 1]]));
    let (gso_size, csum_start, csum_offset) = (le(4), le(6), le(8));

    if flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0 {
        return Err(TxDrop::Malformed(format!(
            "unknown header flags {flags:#x}"
        )));
    }
    let needs_csum = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    if needs_csum {
        if !rules.csum {
            return Err(TxDrop::Malformed(
                "NEEDS_CSUM without VIRTIO_NET_F_CSUM".into(),
            ));
        }
        if csum_start + csum_offset + 2 > frame_len {
            return Err(TxDrop::Malformed(format!(
                "checksum at {csum_start}+{csum_offset} is past the {frame_len}-byte frame"
            )));
        }
    }
    let allowed = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => {
            if frame_len > rules.max_plain {
                return Err(TxDrop::Oversized {
                    len: frame_len,
                    max: rules.max_plain,
                });
            }
            return Ok(());
        }
        VIRTIO_NET_HDR_GSO_TCPV4 => rules.tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => rules.tso6,
        other => {
            return Err(TxDrop::Malformed(format!(
                "GSO type {other:#x} is not offered"
            )))
        }
    };
    if !allowed {
        return Err(TxDrop::Malformed(format!(
            "GSO type {gso_type} without its HOST_TSO feature"
        )));
    }
    if !needs_csum || gso_size == 0 {
        return Err(TxDrop::Malformed(
            "a GSO frame needs NEEDS_CSUM and a non-zero gso_size".into(),
        ));
    }
    if frame_len > MAX_FRAME {
        return Err(TxDrop::Oversized {
            len: frame_len,
            max: MAX_FRAME,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    fn hdr(flags: u32, gso: u32, gso_size: u16, start: u16, off: u16) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[0] = flags as u8;
        h[1] = gso as u8;
        h[4..6].copy_from_slice(&gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&start.to_le_bytes());
        h[8..10].copy_from_slice(&off.to_le_bytes());
        h
    }

    fn rules(bits: &[u32]) -> TxRules {
        TxRules::new(bits.iter().fold(0, |a, b| a | 1u64 << b), 1500)
    }

    #[test]
    fn plain_frames() {
        let r = rules(&[VIRTIO_F_VERSION_1]);
        assert_eq!(r.hdr_len, 12);
        assert_eq!(check_tx(&hdr(0, 0, 0, 0, 0), 60, &r), Ok(()));
        assert_eq!(check_tx(&hdr(0, 0, 0, 0, 0), 1518, &r), Ok(()));
        assert!(matches!(
            check_tx(&hdr(0, 0, 0, 0, 0), 1519, &r),
            Err(TxDrop::Oversized { len: 1519, .. })
        ));
        assert!(matches!(
            check_tx(&hdr(0, 0, 0, 0, 0), 13, &r),
            Err(TxDrop::Malformed(_))
        ));
        assert!(check_tx(&[0; 4], 60, &r).is_err());
        assert!(check_tx(&hdr(0x80, 0, 0, 0, 0), 60, &r).is_err());
    }

    #[test]
    fn offloads_need_their_features() {
        let csum = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 6);
        assert!(check_tx(&csum, 60, &rules(&[])).is_err());
        let r = rules(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        assert_eq!(check_tx(&csum, 60, &r), Ok(()));
        assert!(check_tx(&hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 60, 6), 60, &r).is_err());
        let tso4 = hdr(
            VIRTIO_NET_HDR_F_NEEDS_CSUM,
            VIRTIO_NET_HDR_GSO_TCPV4,
            1448,
            34,
            16,
        );
        assert_eq!(check_tx(&tso4, 30_000, &r), Ok(()));
        assert!(check_tx(&tso4, MAX_FRAME + 1, &r).is_err());
        let tso6 = hdr(
            VIRTIO_NET_HDR_F_NEEDS_CSUM,
            VIRTIO_NET_HDR_GSO_TCPV6,
            1428,
            54,
            16,
        );
        assert!(check_tx(&tso6, 30_000, &r).is_err(), "TSO6 not acked");
        assert!(check_tx(&hdr(0, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 0, 0), 30_000, &r).is_err());
        assert!(check_tx(&hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 3, 1448, 34, 6), 3000, &r).is_err());
    }
}
