//! Tunnel transfers across the chaos harness's user-space WAN (issue 23): the gateway's
//! WireGuard endpoint in one namespace, two CVMs in another — an `Endpoint` (our stack on both
//! ends, as with `cvm-agent`) and wireguard-go with kernel TCP — joined only by the harness's
//! TUN link layer (cluster-tests/src/chaos/link.rs) with 10 ± 2 ms one-way delay and 1 % then
//! 5 % loss each way, then 1 % loss with jitter that reorders packets. Downloads and uploads
//! must complete with every byte in place, and neither endpoint's stack may panic. Root only
//! (namespaces, TUN). `PORTCULLIS_TUNNEL_SOAK=1` moves more bytes per case.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use portcullis_cluster_tests::chaos::link::{spawn_in_netns, DeviceSpec, LinkLayer, LinkParams};
use portcullis_cluster_tests::chaos::topology::{is_root, ScratchNamespaces};
use portcullis_test_support::bulk::{self, download, ping, upload, PORT};
use portcullis_test_support::wggo::{self, WgGo, WgGoSpec};
use portcullis_wg::{Endpoint, EndpointConfig, PeerConfig, PrivateKey};

const NS_GW: &str = "pctw-gw";
const NS_CVM: &str = "pctw-cvm";
const WAN_GW: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const WAN_CVM: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
/// Per transfer; a stall waits forever.
const DEADLINE: Duration = Duration::from_secs(300);

/// An endpoint whose UDP socket lives in namespace `ns` on `wan`.
async fn endpoint_in(ns: &str, wan: Ipv4Addr, tunnel_ip: &str) -> anyhow::Result<Endpoint> {
    let sock = spawn_in_netns(ns, move || {
        let s = std::net::UdpSocket::bind(SocketAddr::from((wan, 0)))?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))??;
    let cfg = EndpointConfig::new(PrivateKey::generate(), tunnel_ip.parse()?);
    Ok(Endpoint::new(cfg, tokio::net::UdpSocket::from_std(sock)?)?)
}

fn peer(e: &Endpoint) -> PeerConfig {
    PeerConfig::new(e.public_key(), e.tunnel_ip()).with_endpoint(e.local_addr())
}

/// (loss, KiB per transfer, jitter ms, jitter reorders). CI moves little: smoltcp recovers
/// from loss slowly (docs/wireguard.md "Loss"); `PORTCULLIS_TUNNEL_SOAK=1` moves more.
fn cases() -> Vec<(f64, u64, u64, bool)> {
    if std::env::var("PORTCULLIS_TUNNEL_SOAK").as_deref() == Ok("1") {
        vec![
            (0.01, 16 << 10, 2, false),
            (0.05, 4 << 10, 2, false),
            (0.01, 8 << 10, 2, true),
        ]
    } else {
        vec![
            (0.01, 1024, 2, false),
            (0.05, 512, 2, false),
            (0.01, 512, 2, true),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_loss_and_reordering() -> anyhow::Result<()> {
    if !is_root() {
        eprintln!("SKIPPED transfers_survive_loss_and_reordering: needs root (namespaces, TUN)");
        return Ok(());
    }
    let _ns = ScratchNamespaces::create(&[NS_GW, NS_CVM])?;
    let wan = LinkLayer::start(
        vec![
            DeviceSpec {
                id: 1,
                region: "gw".into(),
                ns: NS_GW.into(),
                dev: "pctw-w1".into(),
                ip: WAN_GW,
            },
            DeviceSpec {
                id: 2,
                region: "cvm".into(),
                ns: NS_CVM.into(),
                dev: "pctw-w2".into(),
                ip: WAN_CVM,
            },
        ],
        23,
    )?;

    let gw = endpoint_in(NS_GW, WAN_GW, "10.91.0.1").await?;
    let cvm = endpoint_in(NS_CVM, WAN_CVM, "10.91.0.2").await?;
    cvm.set_peers(vec![peer(&gw)]).await?;
    bulk::spawn_server(cvm.listen(PORT).await?);
    let mut peers = vec![peer(&cvm)];
    let mut targets: Vec<(&str, IpAddr)> = vec![("endpoint", cvm.tunnel_ip())];

    // Field order is drop order: the server, then wireguard-go (the namespaces go last).
    let mut kernel_side = None;
    match wggo::skip_reason() {
        Some(why) => eprintln!("wireguard-go CVM leg SKIPPED: {why}"),
        None => {
            // Its UDP socket in the CVM namespace, so its datagrams cross the WAN too.
            let wg = WgGo::start(WgGoSpec {
                ifname: &format!("pctw{}", wggo::suffix()),
                cidr: "10.91.0.3/24",
                ns: NS_CVM,
                udp_in_ns: true,
                mtu: 1420,
            })?;
            wg.add_peer(&gw.public_key(), "10.91.0.1/32", Some(gw.local_addr()))?;
            peers.push(
                PeerConfig::new(wg.public_key, wg.tunnel_ip)
                    .with_endpoint(SocketAddr::from((WAN_CVM, wg.listen_port))),
            );
            let server = bulk::python_server(NS_CVM, wg.tunnel_ip)?;
            targets.push(("wireguard-go", wg.tunnel_ip));
            kernel_side = Some((server, wg));
        }
    }
    gw.set_peers(peers).await?;
    for (name, ip) in &targets {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = ping(&gw, *ip).await {
            anyhow::ensure!(Instant::now() < deadline, "{name} never answered: {e:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut errors = Vec::new();
    for (loss, kib, jitter_ms, reorder) in cases() {
        wan.set_regions(
            "gw",
            "cvm",
            LinkParams {
                delay_ms: 10,
                jitter_ms,
                loss,
                reorder,
            },
        );
        let before = wan.stats();
        let len = kib << 10;
        for (name, ip) in &targets {
            for (what, up) in [("download", false), ("upload", true)] {
                let t0 = Instant::now();
                let r = if up {
                    tokio::time::timeout(DEADLINE, upload(&gw, *ip, len)).await
                } else {
                    tokio::time::timeout(DEADLINE, download(&gw, *ip, len)).await
                };
                let took = t0.elapsed();
                match r {
                    Ok(Ok(())) => eprintln!(
                        "{:.0} % loss{}, {name} {what} {kib} KiB: {:.2} MB/s",
                        loss * 100.0,
                        if reorder { ", reordering" } else { "" },
                        len as f64 / took.as_secs_f64() / 1e6
                    ),
                    Ok(Err(e)) => errors.push(format!("{loss} {name} {what}: {e:#}")),
                    Err(_) => errors.push(format!("{loss} {name} {what}: stalled {DEADLINE:?}")),
                }
            }
        }
        let after = wan.stats();
        eprintln!(
            "{:.0} % loss: link dropped {} and reordered {} of {} packets",
            loss * 100.0,
            after.lost - before.lost,
            after.reordered - before.reordered,
            after.forwarded - before.forwarded
        );
        // The conditions were really there.
        anyhow::ensure!(after.lost > before.lost, "no packet was dropped");
        anyhow::ensure!(
            !reorder || after.reordered > before.reordered,
            "no packet was reordered"
        );
    }
    anyhow::ensure!(errors.is_empty(), "failed transfers: {errors:#?}");
    anyhow::ensure!(
        gw.counters().snapshot().stack_panics == 0,
        "gateway stack panics"
    );
    anyhow::ensure!(
        cvm.counters().snapshot().stack_panics == 0,
        "CVM stack panics"
    );
    drop(kernel_side);
    Ok(())
}
