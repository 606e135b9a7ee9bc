//! Hostile input on the WireGuard port: garbage, oversized datagrams, handshakes from unknown
//! keys and data for unknown sessions. Each is dropped and counted; an open session and new
//! connections keep working throughout.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::raw::RawPeer;
use common::*;
use portcullis_wg::PrivateKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unknown_keys_are_dropped_and_counted() -> Result<()> {
    init_tracing();
    let gw = endpoint("10.97.0.1").await?;
    let cvm = endpoint("10.97.0.2").await?;
    gw.set_peers(vec![peer_of(&cvm)]).await?;
    cvm.set_peers(vec![peer_of(&gw)]).await?;
    spawn_echo(cvm.listen(7).await?);
    let mut s = gw.connect(cvm.tunnel_ip(), 7).await?;
    roundtrip(&mut s, b"hello").await?;

    let attacker = UdpSocket::bind("127.0.0.1:0").await?;
    let target = gw.local_addr();
    // Random bytes of many sizes, including ones with valid-looking message types.
    for i in 0..500usize {
        let mut d = pattern(1 + (i * 37) % 1400, i as u64 + 1);
        if i % 4 == 0 {
            d[0] = (1 + i % 4) as u8; // types 1..4 with wrong lengths/MACs
            for x in d.iter_mut().skip(1).take(3) {
                *x = 0;
            }
        }
        attacker.send_to(&d, target).await?;
        if i % 20 == 0 {
            // Paced so the kernel's receive buffer does not drop any: the counts are exact.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Correctly sized handshake initiation with garbage MACs.
    let mut fake_init = pattern(148, 7);
    fake_init[..4].copy_from_slice(&[1, 0, 0, 0]);
    attacker.send_to(&fake_init, target).await?;
    // Oversized datagram.
    attacker.send_to(&vec![4u8; 9000], target).await?;
    // Data message for a session index nobody owns.
    let mut fake_data = pattern(64, 9);
    fake_data[..4].copy_from_slice(&[4, 0, 0, 0]);
    attacker.send_to(&fake_data, target).await?;

    // A real handshake from a key the gateway does not know.
    let mut stranger = RawPeer::new(PrivateKey::generate(), gw.public_key(), target).await?;
    ensure!(
        stranger.handshake().await.is_err(),
        "an unknown key completed a handshake"
    );

    wait_for("counters", Duration::from_secs(5), || {
        let c = gw.counters().snapshot();
        c.unknown_peer_handshakes >= 1 && c.oversized_datagrams >= 1
    })
    .await?;
    let c = gw.counters().snapshot();
    eprintln!("{c:#?}");
    ensure!(c.invalid_datagrams == 501, "garbage counted: {c:?}");
    ensure!(c.unknown_peer_handshakes == 1, "{c:?}");
    ensure!(c.oversized_datagrams == 1, "{c:?}");
    ensure!(c.unknown_session_index >= 1, "{c:?}");
    ensure!(c.inner_packets_in > 0 && c.spoofed_source == 0, "{c:?}");

    // The existing session and stream still work, and so do new connections.
    roundtrip(&mut s, b"still here").await?;
    let mut s2 = gw.connect(cvm.tunnel_ip(), 7).await?;
    roundtrip(&mut s2, b"new one").await?;
    Ok(())
}

async fn roundtrip(s: &mut portcullis_wg::TunnelStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await??;
    ensure!(got == msg);
    Ok(())
}
