//! Interoperability: wireguard-go on a TUN device in its own network namespace, with
//! `python3 -m http.server` bound on its tunnel address, reached from an Endpoint in this
//! process. Needs root; prints why and passes vacuously otherwise.
//!
//! The wireguard-go process stays in the root namespace (its UDP socket answers on
//! 127.0.0.1) and only its TUN device moves into the namespace: the HTTP server can bind only
//! the tunnel address, and no veth or host address is needed.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::*;
use portcullis_test_support::wggo::{self, Netns, WgGo, WgGoSpec};
use portcullis_wg::PeerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_reaches_http_server_behind_wireguard_go() -> Result<()> {
    init_tracing();
    if let Some(why) = wggo::skip_reason() {
        eprintln!("SKIPPED endpoint_reaches_http_server_behind_wireguard_go: {why}");
        return Ok(());
    }
    let sfx = wggo::suffix();
    let ns = Netns::new(format!("pcwg-interop-{sfx}"))?;
    let ifname = format!("pcwi{sfx}");
    let wg = WgGo::start(WgGoSpec {
        ifname: &ifname,
        cidr: "10.77.0.2/24",
        ns: &ns.name,
        udp_in_ns: false,
        mtu: 1420,
    })?;
    let www = tempfile::tempdir()?;
    std::fs::write(www.path().join("hello.txt"), "hello from wireguard-go\n")?;
    let big = pattern(2 * 1024 * 1024, 5);
    std::fs::write(www.path().join("big.bin"), &big)?;
    let _http = wggo::http_server(&ns.name, wg.tunnel_ip, 8080, www.path())?;

    let gw = endpoint("10.77.0.1").await?;
    wg.add_peer(&gw.public_key(), "10.77.0.1/32", Some(gw.local_addr()))?;
    gw.set_peers(vec![
        PeerConfig::new(wg.public_key, wg.tunnel_ip).with_endpoint(wg.udp_addr_loopback())
    ])
    .await?;

    // python needs a moment to bind; retry until it answers.
    let mut last = String::new();
    let mut ok = false;
    for _ in 0..50 {
        match http_get(&gw, wg.tunnel_ip, 8080, "/hello.txt").await {
            Ok(resp) => {
                last = resp;
                ok = true;
                break;
            }
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(ok, "no HTTP answer through wireguard-go: {last}");
    ensure!(last.starts_with("HTTP/1.0 200"), "{last}");
    ensure!(last.ends_with("hello from wireguard-go\n"), "{last}");

    // A 2 MiB file, checksummed: full-size segments both ways through the kernel stack.
    let mut s = gw.connect(wg.tunnel_ip, 8080).await?;
    s.write_all(b"GET /big.bin HTTP/1.0\r\n\r\n").await?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut resp)).await??;
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .ok_or_else(|| anyhow::anyhow!("no header end"))?;
    ensure!(
        resp.len() - body_at == big.len(),
        "body {} bytes",
        resp.len() - body_at
    );
    ensure!(
        fnv1a(FNV_INIT, &resp[body_at..]) == fnv1a(FNV_INIT, &big),
        "checksum"
    );

    // wireguard-go agrees a handshake happened with our key.
    let show = wggo::run("wg", &["show", &ifname, "latest-handshakes"])?;
    ensure!(show.contains(&gw.public_key().to_base64()), "{show}");
    let c = gw.counters().snapshot();
    ensure!(c.spoofed_source == 0 && c.decapsulate_errors == 0, "{c:?}");
    Ok(())
}
