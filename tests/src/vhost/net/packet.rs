//! Frames the test frontend sends and reads back: Ethernet + IPv4 + UDP / ICMP echo / TCP,
//! built by hand with their checksums, and a parser for what comes back.

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const TCP_HLEN: usize = 20;
const ETHERTYPE_IPV4: u16 = 0x0800;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The Internet checksum's running sum (not folded).
fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (complemented, ready to store).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// The pseudo-header sum for TCP/UDP over IPv4, folded, not complemented: what a driver puts
/// in the checksum field when it asks the device to finish the checksum (NEEDS_CSUM).
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u16 {
    let mut acc = sum(&src, 0);
    acc = sum(&dst, acc);
    acc += u32::from(proto);
    acc += len as u32;
    fold(acc)
}

fn eth(dst: [u8; 6], src: [u8; 6], out: &mut Vec<u8>) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload_len: usize, out: &mut Vec<u8>) {
    let start = out.len();
    let total = (IPV4_HLEN + payload_len) as u16;
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    let c = checksum(&out[start..start + IPV4_HLEN]);
    out[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
}

/// Addresses of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
}

/// How the UDP checksum field is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpCsum {
    /// The full, correct checksum.
    Full,
    /// The pseudo-header sum only (for NEEDS_CSUM).
    Partial,
    /// A wrong value.
    Wrong,
}

/// An Ethernet/IPv4/UDP frame.
pub fn udp_frame(e: &Endpoints, sport: u16, dport: u16, payload: &[u8], csum: UdpCsum) -> Vec<u8> {
    let udp_len = UDP_HLEN + payload.len();
    let mut f = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + udp_len);
    eth(e.dst_mac, e.src_mac, &mut f);
    ipv4(e.src_ip, e.dst_ip, PROTO_UDP, udp_len, &mut f);
    let at = f.len();
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let pseudo = pseudo_sum(e.src_ip, e.dst_ip, PROTO_UDP, udp_len);
    let value = match csum {
        UdpCsum::Full => {
            let c = !fold(sum(&f[at..], u32::from(pseudo)));
            if c == 0 {
                0xffff
            } else {
                c
            }
        }
        UdpCsum::Partial => pseudo,
        UdpCsum::Wrong => 0x1234,
    };
    f[at + 6..at + 8].copy_from_slice(&value.to_be_bytes());
    f
}

/// An ICMP echo request frame.
pub fn icmp_echo(e: &Endpoints, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut f = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + len);
    eth(e.dst_mac, e.src_mac, &mut f);
    ipv4(e.src_ip, e.dst_ip, PROTO_ICMP, len, &mut f);
    let at = f.len();
    f.extend_from_slice(&[8, 0, 0, 0]);
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(payload);
    let c = checksum(&f[at..]);
    f[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
    f
}

/// TCP header fields of [`tcp_partial`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// As in the header, e.g. 0x02 SYN, 0x10 ACK, 0x18 PSH|ACK.
    pub flags: u8,
}

/// A TCP segment with the pseudo-header sum in its checksum field (for NEEDS_CSUM / GSO).
pub fn tcp_partial(e: &Endpoints, t: Tcp, payload: &[u8]) -> Vec<u8> {
    let len = TCP_HLEN + payload.len();
    let mut f = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + len);
    eth(e.dst_mac, e.src_mac, &mut f);
    // A GSO frame's IP total length covers the whole super-frame (at most 64 KiB).
    ipv4(
        e.src_ip,
        e.dst_ip,
        PROTO_TCP,
        len.min(0xffff - IPV4_HLEN),
        &mut f,
    );
    f.extend_from_slice(&t.sport.to_be_bytes());
    f.extend_from_slice(&t.dport.to_be_bytes());
    f.extend_from_slice(&t.seq.to_be_bytes());
    f.extend_from_slice(&t.ack.to_be_bytes());
    f.extend_from_slice(&[(TCP_HLEN as u8 / 4) << 4, t.flags]);
    f.extend_from_slice(&0xffffu16.to_be_bytes());
    let pseudo = pseudo_sum(e.src_ip, e.dst_ip, PROTO_TCP, len);
    f.extend_from_slice(&pseudo.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// What a received frame holds, as far as the tests look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ethertype: u16,
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub proto: u8,
    /// The L4 header and payload (bounded by the IP total length).
    pub l4: Vec<u8>,
}

impl Parsed {
    /// UDP (source port, destination port, stored checksum, payload).
    pub fn udp(&self) -> Option<(u16, u16, u16, &[u8])> {
        if self.proto != PROTO_UDP || self.l4.len() < UDP_HLEN {
            return None;
        }
        let be = |i: usize| u16::from_be_bytes([self.l4[i], self.l4[i + 1]]);
        Some((be(0), be(2), be(6), &self.l4[UDP_HLEN..]))
    }

    /// Whether the UDP/TCP checksum over the pseudo-header verifies.
    pub fn l4_checksum_ok(&self) -> bool {
        let pseudo = pseudo_sum(self.src_ip, self.dst_ip, self.proto, self.l4.len());
        fold(sum(&self.l4, u32::from(pseudo))) == 0xffff
    }
}

/// Parses an Ethernet/IPv4 frame (no VLAN, no IP options beyond the header length).
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    if frame.len() < ETH_HLEN + IPV4_HLEN {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = &frame[ETH_HLEN..];
    if ethertype != ETHERTYPE_IPV4 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total < ihl || total > ip.len() {
        return None;
    }
    let mac = |at: usize| -> [u8; 6] { frame[at..at + 6].try_into().unwrap_or([0; 6]) };
    Some(Parsed {
        dst_mac: mac(0),
        src_mac: mac(6),
        ethertype,
        src_ip: ip[12..16].try_into().unwrap_or([0; 4]),
        dst_ip: ip[16..20].try_into().unwrap_or([0; 4]),
        proto: ip[9],
        l4: ip[ihl..total].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_checksums_verify() {
        let e = Endpoints {
            src_mac: [2; 6],
            dst_mac: [4; 6],
            src_ip: [10, 0, 0, 2],
            dst_ip: [10, 0, 0, 1],
        };
        let f = udp_frame(&e, 1000, 2000, b"hello, odd length", UdpCsum::Full);
        let p = parse(&f).unwrap();
        assert!(p.l4_checksum_ok());
        assert_eq!(p.udp().unwrap().3, b"hello, odd length");
        let f = udp_frame(&e, 1000, 2000, b"x", UdpCsum::Wrong);
        assert!(!parse(&f).unwrap().l4_checksum_ok());
        assert_eq!(checksum(&f[ETH_HLEN..ETH_HLEN + IPV4_HLEN]), 0);
    }
}
