//! Just enough IP header parsing to enforce the tunnel's address rules before a packet reaches
//! the TCP/IP stack (boringtun only checks lengths).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Addresses and length of an inner IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// Parses the IPv4 or IPv6 header. `None` for anything that is not a complete, self-consistent
/// header (wrong version, short, total length beyond the buffer).
pub(crate) fn parse(packet: &[u8]) -> Option<IpHeader> {
    match packet.first()? >> 4 {
        4 => {
            let hdr: &[u8; 20] = packet.get(..20)?.try_into().ok()?;
            let ihl = usize::from(hdr[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
            if ihl < 20 || total < ihl || total > packet.len() {
                return None;
            }
            let src = Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]);
            let dst = Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]);
            Some(IpHeader {
                src: src.into(),
                dst: dst.into(),
            })
        }
        6 => {
            let hdr: &[u8; 40] = packet.get(..40)?.try_into().ok()?;
            let payload = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
            if 40 + payload > packet.len() {
                return None;
            }
            let src: [u8; 16] = hdr[8..24].try_into().ok()?;
            let dst: [u8; 16] = hdr[24..40].try_into().ok()?;
            Some(IpHeader {
                src: Ipv6Addr::from(src).into(),
                dst: Ipv6Addr::from(dst).into(),
            })
        }
        _ => None,
    }
}

/// Source and destination port of a TCP packet whose TCP header follows the IP header directly
/// (IPv4 without fragmentation, IPv6 without extension headers). `None` for anything else,
/// including a header that `parse` would refuse.
pub(crate) fn tcp_ports(packet: &[u8]) -> Option<(u16, u16)> {
    parse(packet)?;
    let tcp = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let flags_offset = u16::from_be_bytes([packet[6], packet[7]]);
            // More-fragments set or a non-zero offset: not a whole TCP segment.
            if packet[9] != 6 || flags_offset & 0x3fff != 0 {
                return None;
            }
            packet.get(ihl..)?
        }
        6 if packet[6] == 6 => packet.get(40..)?,
        _ => return None,
    };
    let ports: &[u8; 4] = tcp.get(..4)?.try_into().ok()?;
    Some((
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], dst: [u8; 4], total: u16, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn parses_ipv4() {
        let h = parse(&v4([10, 0, 0, 2], [10, 0, 0, 1], 40, 40)).expect("valid");
        assert_eq!(h.src, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(h.dst, IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn rejects_truncated_and_inconsistent() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0x45; 10]), None);
        // Claims more bytes than it has.
        assert_eq!(parse(&v4([1, 1, 1, 1], [2, 2, 2, 2], 100, 40)), None);
        // Total length shorter than the header.
        assert_eq!(parse(&v4([1, 1, 1, 1], [2, 2, 2, 2], 10, 40)), None);
        // Version 5.
        let mut p = v4([1, 1, 1, 1], [2, 2, 2, 2], 40, 40);
        p[0] = 0x55;
        assert_eq!(parse(&p), None);
    }

    #[test]
    fn parses_ipv6() {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&20u16.to_be_bytes());
        p[23] = 2;
        p[39] = 1;
        let h = parse(&p).expect("valid");
        assert_eq!(h.src, "::2".parse::<IpAddr>().expect("ip"));
        assert_eq!(h.dst, "::1".parse::<IpAddr>().expect("ip"));
        assert_eq!(parse(&p[..50]), None);
    }

    #[test]
    fn finds_tcp_ports() {
        let mut p = v4([10, 0, 0, 2], [10, 0, 0, 1], 40, 40);
        p[9] = 6;
        p[20..24].copy_from_slice(&[0x1f, 0x90, 0xc3, 0x50]);
        assert_eq!(tcp_ports(&p), Some((8080, 50000)));
        // A fragment, UDP, a short TCP header.
        let mut frag = p.clone();
        frag[6] = 0x20;
        assert_eq!(tcp_ports(&frag), None);
        let mut udp = p.clone();
        udp[9] = 17;
        assert_eq!(tcp_ports(&udp), None);
        let mut short = v4([10, 0, 0, 2], [10, 0, 0, 1], 22, 22);
        short[9] = 6;
        assert_eq!(tcp_ports(&short), None);

        let mut p6 = vec![0u8; 60];
        p6[0] = 0x60;
        p6[4..6].copy_from_slice(&20u16.to_be_bytes());
        p6[6] = 6;
        p6[40..44].copy_from_slice(&[0, 80, 0, 81]);
        assert_eq!(tcp_ports(&p6), Some((80, 81)));
        p6[6] = 0; // hop-by-hop options first
        assert_eq!(tcp_ports(&p6), None);
    }
}
