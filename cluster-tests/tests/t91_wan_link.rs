//! The chaos harness's user-space WAN (cluster-tests/src/chaos/link.rs): two namespaces joined
//! only by harness-owned TUN devices; TCP round trips between them show the configured delay
//! and loss. Root only (namespaces, TUN).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use portcullis_cluster_tests::chaos::link::{spawn_in_netns, DeviceSpec, LinkLayer, LinkParams};
use portcullis_cluster_tests::chaos::topology::{is_root, ScratchNamespaces};

const NS_A: &str = "pclt-a";
const NS_B: &str = "pclt-b";
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const PORT: u16 = 17007;

/// A TCP echo server in namespace B (a thread that lives until the test process exits).
fn start_echo() -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let _server = spawn_in_netns(NS_B, move || {
        let l = TcpListener::bind(SocketAddr::from((IP_B, PORT)));
        let ok = l.is_ok();
        let _ = tx.send(l.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        if !ok {
            return Ok(());
        }
        let l = l?;
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(())
    });
    rx.recv_timeout(Duration::from_secs(10))?
        .map_err(|e| anyhow::anyhow!("echo server bind: {e}"))
}

/// The smallest of `rounds` one-byte TCP echo round trips from namespace A to B over one
/// fresh connection, or the error (connect timeout or no reply within 1.5 s).
async fn min_rtt(rounds: usize) -> anyhow::Result<Duration> {
    let h = spawn_in_netns(NS_A, move || {
        let addr = SocketAddr::from((IP_B, PORT));
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))?;
        c.set_read_timeout(Some(Duration::from_millis(1500)))?;
        c.set_nodelay(true)?;
        let mut best = Duration::MAX;
        for _ in 0..rounds {
            let t = Instant::now();
            c.write_all(b"x")?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)?;
            best = best.min(t.elapsed());
        }
        Ok(best)
    });
    tokio::task::spawn_blocking(move || h.join())
        .await?
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// Retries `min_rtt` until `ok` accepts the result or `within` passes; returns the last result.
async fn rtt_until(
    within: Duration,
    ok: impl Fn(&anyhow::Result<Duration>) -> bool,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + within;
    loop {
        let r = min_rtt(5).await;
        if ok(&r) || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wan_link_delays_and_drops() {
    if !is_root() {
        eprintln!("SKIP: t91_wan_link needs root (network namespaces and TUN devices)");
        return;
    }
    let _ns = ScratchNamespaces::create(&[NS_A, NS_B]).expect("create namespaces");
    let specs = vec![
        DeviceSpec {
            id: 1,
            region: "ra".into(),
            ns: NS_A.into(),
            dev: "pclt-w1".into(),
            ip: IP_A,
        },
        DeviceSpec {
            id: 2,
            region: "rb".into(),
            ns: NS_B.into(),
            dev: "pclt-w2".into(),
            ip: IP_B,
        },
    ];
    let wan = LinkLayer::start(specs, 42).expect("start link layer");
    start_echo().expect("echo server");

    // 0 ms: the round trip is only our forwarding (two hops through the harness).
    let fast = rtt_until(Duration::from_secs(20), |r| {
        r.as_ref().is_ok_and(|d| *d < Duration::from_millis(50))
    })
    .await
    .expect("echo with no delay");
    eprintln!("rtt with 0 ms one-way delay: {fast:?}");
    assert!(fast < Duration::from_millis(50), "{fast:?}");

    // 50 ms each way: every round trip takes at least 100 ms.
    wan.set_regions(
        "ra",
        "rb",
        LinkParams {
            delay_ms: 50,
            jitter_ms: 0,
            loss: 0.0,
            reorder: false,
        },
    );
    let slow = min_rtt(5).await.expect("echo with 50 ms delay");
    eprintln!("rtt with 50 ms one-way delay: {slow:?}");
    assert!(slow >= Duration::from_millis(100), "{slow:?}");
    assert!(slow < Duration::from_millis(1000), "{slow:?}");

    // Jitter never reorders a link, so the echo still works and stays >= delay - jitter.
    wan.set_regions(
        "ra",
        "rb",
        LinkParams {
            delay_ms: 50,
            jitter_ms: 20,
            loss: 0.0,
            reorder: false,
        },
    );
    let jittered = min_rtt(5).await.expect("echo with jitter");
    eprintln!("rtt with 50±20 ms one-way: {jittered:?}");
    assert!(jittered >= Duration::from_millis(60), "{jittered:?}");

    // 100% loss: no connection, no reply.
    wan.set_regions(
        "ra",
        "rb",
        LinkParams {
            delay_ms: 0,
            jitter_ms: 0,
            loss: 1.0,
            reorder: false,
        },
    );
    let lost = min_rtt(1).await;
    eprintln!(
        "with 100% loss: {:?}",
        lost.as_ref().map_err(|e| format!("{e:#}"))
    );
    assert!(lost.is_err(), "a reply crossed a 100% loss link: {lost:?}");
    assert!(wan.stats().lost > 0, "{:?}", wan.stats());

    // Back to 0%: replies again.
    wan.set_regions("ra", "rb", LinkParams::default());
    let back = rtt_until(Duration::from_secs(20), |r| r.is_ok())
        .await
        .expect("echo after loss removed");
    eprintln!("rtt after loss removed: {back:?}; stats {:?}", wan.stats());
    drop(wan);
}
