//! Isolation through a gateway: CVM A, a raw WireGuard peer that crafts its own inner packets,
//! tries to reach CVM B through the gateway G, and to impersonate B. Nothing gets through and
//! G's counters say why. A positive control (A → G itself) proves the raw peer works, so the
//! negative results are not vacuous.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{ensure, Result};
use common::raw::{tcp_summary, tcp_summary_ports, tcp_syn, RawPeer};
use common::*;
use portcullis_wg::{PeerConfig, PrivateKey};

const G: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const A: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 3);
const SYN_ACK: u8 = 0x12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cvm_cannot_reach_or_impersonate_another_cvm() -> Result<()> {
    init_tracing();
    let g = endpoint(&G.to_string()).await?;
    let b = endpoint(&B.to_string()).await?;
    let a_key = PrivateKey::generate();
    let mut a = RawPeer::new(a_key.clone(), g.public_key(), g.local_addr()).await?;

    g.set_peers(vec![
        PeerConfig::new(a.public_key(), IpAddr::V4(A)),
        peer_of(&b),
    ])
    .await?;
    b.set_peers(vec![peer_of(&g)]).await?;
    let _g_listener = g.listen(80).await?;
    let _b_listener = b.listen(80).await?;
    // B has a working session with G, so a forwarded packet would have a way to reach it.
    let _legit = g.connect(b.tunnel_ip(), 80).await?;
    // Let the legitimate handshake's last ACK land before taking the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b_in_before = b.counters().snapshot().inner_packets_in;

    a.handshake().await?;

    // Positive control: A → G:80 is answered with SYN-ACK.
    a.send_ip(&tcp_syn(A, 40000, G, 80)).await?;
    let reply = a
        .recv_ip(Duration::from_secs(3))
        .await
        .ok_or_else(|| anyhow::anyhow!("control SYN got no answer"))?;
    ensure!(
        tcp_summary(&reply) == Some((G, A, SYN_ACK)),
        "control: unexpected reply {:?}",
        tcp_summary(&reply)
    );

    // 1. A → B through G (forwarding attempt).
    a.send_ip(&tcp_syn(A, 40001, B, 80)).await?;
    // 2. A pretends to be B, talking to G.
    a.send_ip(&tcp_syn(B, 40002, G, 80)).await?;
    // 3. A pretends to be B, talking to B through G.
    a.send_ip(&tcp_syn(B, 40003, B, 80)).await?;

    // G may still retransmit the control SYN-ACK (A never completes it); anything addressed
    // to the ports of the forbidden SYNs would be an answer that must not exist.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Some(p) = a
        .recv_ip(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        let s = tcp_summary_ports(&p);
        ensure!(
            !matches!(s, Some((_, _, _, 40001..=40003))),
            "A received an answer to a forbidden packet: {s:?}"
        );
    }
    let gs = g.counters().snapshot();
    ensure!(gs.not_for_us == 1, "forwarding attempts counted: {gs:?}");
    ensure!(gs.spoofed_source == 2, "spoofed sources counted: {gs:?}");
    let bs = b.counters().snapshot();
    ensure!(
        bs.inner_packets_in == b_in_before,
        "B received packets it should not have: {bs:?}"
    );
    // B accepted only the legitimate connection; G accepted nothing from spoofed sources.
    ensure!(
        bs.accepted == 1 && gs.accepted == 0,
        "no connection may form: {gs:?} {bs:?}"
    );

    // The legitimate peer is unaffected.
    ensure!(g.connect(b.tunnel_ip(), 80).await.is_ok());
    Ok(())
}
