//! The pure parsers, compiled from their source files so that fuzzing them does not build
//! Raft, tonic and the rest of the node. Each file depends on `std` and at most `thiserror`,
//! `bytes`, `http` and `httparse`. (The `raft_payload` and `registration` targets use the
//! Raft, proto and WireGuard crates directly instead.)

#![forbid(unsafe_code)]

use std::net::IpAddr;

#[path = "../../src/edge/clienthello.rs"]
pub mod clienthello;
#[path = "../../../geo/src/select/cookie.rs"]
pub mod cookie;
#[path = "../../src/edge/grammar.rs"]
pub mod grammar;
#[path = "../../src/edge/h1wire.rs"]
pub mod h1wire;
#[path = "../../src/edge/hostport.rs"]
pub mod hostport;
#[path = "../../src/edge/proxy_protocol.rs"]
pub mod proxy_protocol;
#[path = "../../../wg/src/packet.rs"]
mod wg_packet;
#[path = "../../src/edge/xff.rs"]
pub mod xff;

/// `portcullis-wg`'s inner IP header check (`packet::parse`, crate-private there): the source
/// and destination addresses of a complete, self-consistent IPv4 or IPv6 header.
pub fn wg_packet_addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    wg_packet::parse(packet).map(|h| (h.src, h.dst))
}

/// `portcullis-wg`'s TCP port lookup (`packet::tcp_ports`), which routes each decrypted packet
/// to its socket's stack.
pub fn wg_packet_tcp_ports(packet: &[u8]) -> Option<(u16, u16)> {
    wg_packet::tcp_ports(packet)
}
