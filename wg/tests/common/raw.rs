//! A hand-driven WireGuard peer (a bare boringtun `Tunn` on a UDP socket) that can send any
//! inner packet: what a malicious CVM could do that our own `Endpoint` never would.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use portcullis_wg::{PrivateKey, PublicKey};
use tokio::net::UdpSocket;

pub struct RawPeer {
    pub key: PrivateKey,
    pub sock: UdpSocket,
    pub tunn: Tunn,
    pub server: SocketAddr,
    buf: Vec<u8>,
}

impl RawPeer {
    pub async fn new(key: PrivateKey, server_key: PublicKey, server: SocketAddr) -> Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        let secret = x25519::StaticSecret::from(key_bytes(&key));
        let tunn = Tunn::new(
            secret,
            x25519::PublicKey::from(*server_key.as_bytes()),
            None,
            None,
            rand::random::<u32>() >> 8,
            None,
        );
        Ok(Self {
            key,
            sock,
            tunn,
            server,
            buf: vec![0u8; 65536],
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Runs the handshake; returns Err if the server never answers.
    pub async fn handshake(&mut self) -> Result<()> {
        let mut out = vec![0u8; 2048];
        match self.tunn.format_handshake_initiation(&mut out, false) {
            TunnResult::WriteToNetwork(p) => {
                self.sock.send_to(p, self.server).await?;
            }
            other => bail!("no handshake initiation: {other:?}"),
        }
        let n = tokio::time::timeout(Duration::from_secs(3), self.sock.recv(&mut self.buf))
            .await
            .context("no handshake response")??;
        match self.tunn.decapsulate(None, &self.buf[..n], &mut out) {
            TunnResult::WriteToNetwork(p) => {
                self.sock.send_to(p, self.server).await?;
            }
            other => bail!("unexpected handshake result: {other:?}"),
        }
        Ok(())
    }

    pub async fn send_ip(&mut self, packet: &[u8]) -> Result<()> {
        let mut out = vec![0u8; packet.len() + 256];
        match self.tunn.encapsulate(packet, &mut out) {
            TunnResult::WriteToNetwork(p) => {
                self.sock.send_to(p, self.server).await?;
                Ok(())
            }
            other => bail!("encapsulate: {other:?}"),
        }
    }

    /// Next inner packet from the server within `wait`, skipping keepalives.
    pub async fn recv_ip(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = vec![0u8; 65536];
        loop {
            let n = tokio::time::timeout_at(deadline, self.sock.recv(&mut self.buf))
                .await
                .ok()?
                .ok()?;
            match self.tunn.decapsulate(None, &self.buf[..n], &mut out) {
                TunnResult::WriteToTunnelV4(p, _) => return Some(p.to_vec()),
                TunnResult::WriteToNetwork(p) => {
                    let _ = self.sock.send_to(p, self.server).await;
                }
                _ => {}
            }
        }
    }
}

fn key_bytes(k: &PrivateKey) -> [u8; 32] {
    use base64::Engine;
    let v = base64::engine::general_purpose::STANDARD
        .decode(k.to_base64())
        .expect("own encoding");
    v.try_into().expect("32 bytes")
}

/// An IPv4 TCP SYN from `src:sport` to `dst:dport`, with valid checksums.
pub fn tcp_syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&rand::random::<u32>().to_be_bytes());
    t[12] = 5 << 4; // data offset
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&8192u16.to_be_bytes());
    let mut pseudo = 0u32;
    for chunk in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
        pseudo += u32::from(u16::from_be_bytes([chunk[2], chunk[3]]));
    }
    pseudo += 6 + 20;
    let c = checksum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for w in data.chunks(2) {
        let v = if w.len() == 2 {
            u16::from_be_bytes([w[0], w[1]])
        } else {
            u16::from_be_bytes([w[0], 0])
        };
        sum += u32::from(v);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// (src, dst, tcp flags) of an IPv4 TCP packet.
pub fn tcp_summary(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8)> {
    tcp_summary_ports(p).map(|(s, d, f, _)| (s, d, f))
}

/// (src, dst, tcp flags, destination port) of an IPv4 TCP packet.
pub fn tcp_summary_ports(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, u16)> {
    if p.len() < 40 || p[0] >> 4 != 4 || p[9] != 6 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let dport = u16::from_be_bytes([*p.get(ihl + 2)?, *p.get(ihl + 3)?]);
    Some((src, dst, *p.get(ihl + 13)?, dport))
}
