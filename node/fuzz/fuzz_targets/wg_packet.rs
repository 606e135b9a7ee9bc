#![no_main]
//! The WireGuard driver's inner IP header check: every decrypted packet passes it before the
//! address rules (no spoofed source, no forwarding) are applied. Its answer must agree with the
//! header's own fields, and never read past the packet. The TCP port lookup that routes a
//! packet to its socket's stack answers only for accepted packets.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::{wg_packet_addresses, wg_packet_tcp_ports};

fuzz_target!(|data: &[u8]| {
    let parsed = wg_packet_addresses(data);
    let expected = match data.first().map(|b| b >> 4) {
        Some(4) if data.len() >= 20 => {
            let ihl = usize::from(data[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([data[2], data[3]]));
            (ihl >= 20 && total >= ihl && total <= data.len()).then(|| {
                let src = Ipv4Addr::new(data[12], data[13], data[14], data[15]);
                let dst = Ipv4Addr::new(data[16], data[17], data[18], data[19]);
                (IpAddr::V4(src), IpAddr::V4(dst))
            })
        }
        Some(6) if data.len() >= 40 => {
            let payload = usize::from(u16::from_be_bytes([data[4], data[5]]));
            (40 + payload <= data.len()).then(|| {
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src.copy_from_slice(&data[8..24]);
                dst.copy_from_slice(&data[24..40]);
                (
                    IpAddr::V6(Ipv6Addr::from(src)),
                    IpAddr::V6(Ipv6Addr::from(dst)),
                )
            })
        }
        _ => None,
    };
    assert_eq!(parsed, expected);
    // A TCP port lookup (which picks the socket a packet goes to) only ever answers for a
    // packet the header check accepts.
    let ports = wg_packet_tcp_ports(data);
    if ports.is_some() {
        assert!(parsed.is_some(), "ports {ports:?} for a packet the header check refuses");
    }
    // Bytes after the packet (a datagram's padding) never change the answer for a valid one.
    if parsed.is_some() {
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[0xff; 7]);
        assert_eq!(wg_packet_addresses(&longer), parsed);
        if ports.is_some() {
            assert_eq!(wg_packet_tcp_ports(&longer), ports);
        }
    }
});
