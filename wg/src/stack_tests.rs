//! TCP segments built by hand, for tests of the TCP/IP stack as the driver runs it.

use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

pub(crate) const MTU: usize = 1420;
/// Largest TCP payload in one IPv4 packet of `MTU` bytes.
pub(crate) const MSS: usize = MTU - 40;

/// One TCP segment, owned, in host terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub src_port: u16,
    pub dst_port: u16,
    pub control: TcpControl,
    pub seq: u32,
    pub ack: Option<u32>,
    pub window: u16,
    pub window_scale: Option<u8>,
    pub mss: Option<u16>,
    pub sack_permitted: bool,
    pub sack_ranges: [Option<(u32, u32)>; 3],
    pub payload: Vec<u8>,
}

impl Segment {
    pub fn new(src_port: u16, dst_port: u16, control: TcpControl, seq: u32) -> Self {
        Self {
            src_port,
            dst_port,
            control,
            seq,
            ack: None,
            window: 65535,
            window_scale: None,
            mss: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            payload: Vec::new(),
        }
    }
}

/// An IPv4 packet carrying `seg` from `src` to `dst`, checksums included.
pub(crate) fn ipv4_tcp(src: Ipv4Addr, dst: Ipv4Addr, seg: &Segment) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let tcp = TcpRepr {
        src_port: seg.src_port,
        dst_port: seg.dst_port,
        control: seg.control,
        seq_number: TcpSeqNumber(seg.seq as i32),
        ack_number: seg.ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: seg.window,
        window_scale: seg.window_scale,
        max_seg_size: seg.mss,
        sack_permitted: seg.sack_permitted,
        sack_ranges: seg.sack_ranges,
        timestamp: None,
        payload: &seg.payload,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
    let mut packet = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut packet, &caps);
    let mut tcp_packet = TcpPacket::new_unchecked(packet.payload_mut());
    tcp.emit(
        &mut tcp_packet,
        &IpAddress::from(src),
        &IpAddress::from(dst),
        &caps,
    );
    buf
}

/// The TCP segment inside an IPv4 packet, if it is one (checksums verified).
pub(crate) fn parse_ipv4_tcp(buf: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, Segment)> {
    let caps = ChecksumCapabilities::default();
    let packet = Ipv4Packet::new_checked(buf).ok()?;
    let ip = Ipv4Repr::parse(&packet, &caps).ok()?;
    if ip.next_header != IpProtocol::Tcp {
        return None;
    }
    let tcp_packet = TcpPacket::new_checked(packet.payload()).ok()?;
    let (src, dst) = (IpAddress::from(ip.src_addr), IpAddress::from(ip.dst_addr));
    let tcp = TcpRepr::parse(&tcp_packet, &src, &dst, &caps).ok()?;
    let seg = Segment {
        src_port: tcp.src_port,
        dst_port: tcp.dst_port,
        control: tcp.control,
        seq: tcp.seq_number.0 as u32,
        ack: tcp.ack_number.map(|a| a.0 as u32),
        window: tcp.window_len,
        window_scale: tcp.window_scale,
        mss: tcp.max_seg_size,
        sack_permitted: tcp.sack_permitted,
        sack_ranges: tcp.sack_ranges,
        payload: tcp.payload.to_vec(),
    };
    Some((ip.src_addr, ip.dst_addr, seg))
}
