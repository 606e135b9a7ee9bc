//! A gateway endpoint with one IPv4 and one IPv6 address (`secondary_ip`) serving an IPv4 CVM
//! and an IPv6 CVM at once: connections both ways pick the address of the peer's family, and
//! the source and destination checks hold for IPv6 peers too (a raw peer that crafts its own
//! IPv6 packets cannot forward through the gateway or speak as another CVM).

mod common;

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use anyhow::{ensure, Result};
use boringtun::noise::TunnResult;
use common::raw::RawPeer;
use common::*;
use portcullis_wg::{EndpointConfig, PeerConfig, PrivateKey, WgError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GW4: &str = "198.18.0.1";
const GW6: &str = "fd70:6f72:7463::1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_serves_ipv4_and_ipv6_cvms() -> Result<()> {
    init_tracing();
    let mut cfg = EndpointConfig::new(PrivateKey::generate(), ip(GW4));
    cfg.secondary_ip = Some(ip(GW6));
    let gw = endpoint_with(cfg).await?;
    let cvm4 = endpoint("100.64.0.2").await?;
    let cvm6 = endpoint("fd00:1::2").await?;
    gw.set_peers(vec![peer_of(&cvm4), peer_of(&cvm6)]).await?;
    cvm4.set_peers(vec![peer_of(&gw)]).await?;
    // The IPv6 CVM knows the gateway by its IPv6 address (AllowedIPs = GW6/128).
    cvm6.set_peers(vec![
        PeerConfig::new(gw.public_key(), ip(GW6)).with_endpoint(gw.local_addr())
    ])
    .await?;
    spawn_http(cvm4.listen(80).await?);
    spawn_http(cvm6.listen(80).await?);

    for cvm in [&cvm4, &cvm6] {
        let resp = http_get(&gw, cvm.tunnel_ip(), 80, "/family").await?;
        ensure!(
            resp.ends_with("you asked for GET /family HTTP/1.1"),
            "{}: {resp:?}",
            cvm.tunnel_ip()
        );
    }

    // The IPv6 CVM connects to the gateway: both ends see IPv6 addresses.
    let mut listener = gw.listen(9000).await?;
    let client = tokio::spawn({
        let cvm6 = cvm6.clone();
        async move {
            let mut s = cvm6.connect(ip(GW6), 9000).await?;
            s.write_all(b"ping").await?;
            s.shutdown().await?;
            anyhow::Ok(s.local_addr())
        }
    });
    let mut accepted = listener.accept().await.expect("accepted");
    let mut got = Vec::new();
    accepted.read_to_end(&mut got).await?;
    ensure!(got == b"ping", "got {got:?}");
    ensure!(accepted.local_addr().ip() == ip(GW6), "{accepted:?}");
    ensure!(accepted.peer_addr().ip() == ip("fd00:1::2"), "{accepted:?}");
    let client_local = client.await??;
    ensure!(client_local.ip() == ip("fd00:1::2"), "{client_local}");

    // Connecting to its own IPv6 address is refused like the IPv4 one.
    ensure!(matches!(
        gw.connect(ip(GW6), 80).await,
        Err(WgError::ConnectToSelf(_))
    ));
    Ok(())
}

#[tokio::test]
async fn secondary_address_rules() -> Result<()> {
    // Same family twice: refused (one address per family).
    let mut cfg = EndpointConfig::new(PrivateKey::generate(), ip(GW4));
    cfg.secondary_ip = Some(ip("198.18.0.2"));
    ensure!(matches!(cfg.validate(), Err(WgError::InvalidTunnelIp(_))));
    // An IPv6 address needs an MTU of at least 1280 (RFC 8200).
    cfg.secondary_ip = Some(ip(GW6));
    cfg.mtu = 1200;
    ensure!(matches!(cfg.validate(), Err(WgError::InvalidMtu { .. })));
    cfg.mtu = 1420;
    cfg.validate()?;

    // A peer may not claim the gateway's IPv6 address.
    let gw = endpoint_with(cfg).await?;
    let liar = PeerConfig::new(PrivateKey::generate().public_key(), ip(GW6));
    ensure!(matches!(
        gw.set_peers(vec![liar]).await,
        Err(WgError::PeerIsSelf { .. })
    ));
    Ok(())
}

/// An IPv6 TCP SYN from `src:sport` to `dst:dport`, with a valid checksum.
fn tcp_syn6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // header length: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    // Checksum over the IPv6 pseudo-header (RFC 8200 8.1) and the segment.
    let mut pseudo = Vec::with_capacity(40 + tcp.len());
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((tcp.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, 6]);
    pseudo.extend(&tcp);
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend((tcp.len() as u16).to_be_bytes());
    p.extend([6, 64]); // next header TCP, hop limit
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(tcp);
    p
}

/// (src, dst, TCP flags, destination port) of an IPv6 TCP packet.
fn tcp6_summary(p: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr, u8, u16)> {
    if p.len() < 60 || p[0] >> 4 != 6 || p[6] != 6 {
        return None;
    }
    let addr = |o: usize| -> Option<Ipv6Addr> {
        let b: [u8; 16] = p.get(o..o + 16)?.try_into().ok()?;
        Some(Ipv6Addr::from(b))
    };
    Some((
        addr(8)?,
        addr(24)?,
        p[53],
        u16::from_be_bytes([p[42], p[43]]),
    ))
}

/// The next IPv6 packet the gateway sends the raw peer within `wait`.
async fn recv_ip6(a: &mut RawPeer, wait: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    let mut out = vec![0u8; 65536];
    loop {
        let n = tokio::time::timeout_at(deadline, a.sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        match a.tunn.decapsulate(None, &buf[..n], &mut out) {
            TunnResult::WriteToTunnelV6(p, _) => return Some(p.to_vec()),
            TunnResult::WriteToNetwork(p) => {
                let _ = a.sock.send_to(p, a.server).await;
            }
            _ => {}
        }
    }
}

/// The isolation rules hold for IPv6 peers of a dual-address gateway: a CVM that crafts its
/// own packets can reach the gateway's IPv6 address (control) but cannot reach another IPv6
/// CVM through it, nor speak as that CVM's /128.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_peers_cannot_forward_or_spoof() -> Result<()> {
    init_tracing();
    let g6: Ipv6Addr = GW6.parse()?;
    let a6: Ipv6Addr = "fd00:1::2".parse()?;
    let b6: Ipv6Addr = "fd00:1::3".parse()?;
    let mut cfg = EndpointConfig::new(PrivateKey::generate(), ip(GW4));
    cfg.secondary_ip = Some(IpAddr::V6(g6));
    let g = endpoint_with(cfg).await?;
    let b = endpoint(&b6.to_string()).await?;
    let mut a = RawPeer::new(PrivateKey::generate(), g.public_key(), g.local_addr()).await?;
    g.set_peers(vec![
        PeerConfig::new(a.public_key(), IpAddr::V6(a6)),
        peer_of(&b),
    ])
    .await?;
    b.set_peers(vec![
        PeerConfig::new(g.public_key(), IpAddr::V6(g6)).with_endpoint(g.local_addr())
    ])
    .await?;
    let _g_listener = g.listen(80).await?;
    let _b_listener = b.listen(80).await?;
    // B has a session with G, so a forwarded packet would have a way to reach it.
    let _legit = g.connect(b.tunnel_ip(), 80).await?;
    a.handshake().await?;

    // Control: A → G's IPv6 address is answered with a SYN-ACK from that address.
    a.send_ip(&tcp_syn6(a6, 40000, g6, 80)).await?;
    let reply = recv_ip6(&mut a, Duration::from_secs(3))
        .await
        .ok_or_else(|| anyhow::anyhow!("control SYN got no answer"))?;
    let (src, dst, flags, _) =
        tcp6_summary(&reply).ok_or_else(|| anyhow::anyhow!("not TCP/IPv6: {reply:?}"))?;
    ensure!(
        (src, dst, flags) == (g6, a6, 0x12),
        "control: {src} -> {dst} flags {flags:#x}"
    );
    let b_in_before = b.counters().snapshot().inner_packets_in;

    a.send_ip(&tcp_syn6(a6, 40001, b6, 80)).await?; // forwarding attempt
    a.send_ip(&tcp_syn6(b6, 40002, g6, 80)).await?; // speaking as B
    let mut answered = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Some(p) = recv_ip6(
        &mut a,
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await
    {
        if let Some((_, _, _, port @ 40001..=40002)) = tcp6_summary(&p) {
            answered.push(port);
        }
    }
    ensure!(
        answered.is_empty(),
        "answers to forbidden packets: {answered:?}"
    );
    let gs = g.counters().snapshot();
    ensure!(gs.not_for_us == 1, "forwarding attempts counted: {gs:?}");
    ensure!(gs.spoofed_source == 1, "spoofed sources counted: {gs:?}");
    let bs = b.counters().snapshot();
    ensure!(
        bs.inner_packets_in == b_in_before,
        "B received packets it should not have: {bs:?}"
    );
    Ok(())
}
