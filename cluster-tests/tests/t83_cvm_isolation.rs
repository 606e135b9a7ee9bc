//! Isolation between CVMs through real gateways (issue 4, "How it is proven": CVM A sending to
//! CVM B's tunnel IP, or spoofing B's source address, gets nothing through).
//!
//! Two CVMs of two apps, each running wireguard-go on a TUN device in its own network namespace,
//! configured from `cvm-agent --print-wg-config` like t81. Both are then configured so that the
//! attack *would* work if a gateway forwarded: A routes B's /32 over the gateway under test, and
//! B accepts A's /32 (and answers to it) from that same gateway, so only the gateway's own rules
//! stand between them. B runs a packet sniffer (AF_PACKET on its TUN device) that logs every
//! packet arriving from the tunnel. Each gateway in turn:
//! 1. A → B's tunnel IP (UDP datagrams and a TCP connect to B's HTTP port): the gateway's
//!    `not_for_us` counter rises, the connect fails, and B's sniffer sees nothing from A.
//! 2. A speaks as B (B's address added to A's interface, sockets bound to it) to the gateway's
//!    own tunnel address: `spoofed_source` rises and B receives no reply (no RST, no ICMP) that
//!    an accepted spoofed packet would provoke.
//!
//! Controls, so the test can fail: curl through every gateway's edge reaches an HTTP server on
//! each CVM's tunnel address before and after, and B's sniffer sees that traffic (the path
//! gateway → B works); a temporary direct A↔B peering shows the sniffer logs A's packets and the
//! probe reports a completed connect when delivery does happen; the counters rising prove A's
//! packets reached the gateway. Absence is then checked over a bounded window after that proof.
//!
//! Needs root (namespaces, TUN); prints `SKIPPED` and passes vacuously otherwise.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_cluster_tests::cvm::{
    agent_config, curl_https, gateway_peers, issue_credential, register_once, start_wggo_cvm,
    wg_event, wg_event_now, wg_quick_address, AgentSpec, GatewayPeer, WgGoCvm,
};
use portcullis_cluster_tests::harness::{phase, show, wait_for, TestCluster};
use portcullis_test_support::wggo::{self, ns_exec, Proc};

/// UDP port on B that A's datagrams target (nothing listens; the sniffer sees them regardless).
const B_UDP_PORT: u16 = 7777;
/// B's HTTP server port: a TCP connect from A that got through would complete.
const HTTP_PORT: u16 = 8080;
/// Ports on the gateway the spoofed packets target. Nothing listens there, so an accepted
/// spoofed SYN would be answered with a RST and an accepted datagram with ICMP unreachable,
/// both sent to B: that is what B's sniffer looks for.
const SPOOF_TCP_PORT: u16 = 7001;
const SPOOF_UDP_PORT: u16 = 7002;
/// How long B keeps listening after the gateway has counted (hence received) A's packets. A
/// forwarded packet would arrive within milliseconds; this only bounds the proof of absence.
const ABSENCE_WINDOW: Duration = Duration::from_secs(2);

/// Logs every packet arriving on a TUN device, one line each:
/// `<ip proto> <src> <sport> <dst> <dport>` (ports 0 for non-TCP/UDP), `other <len>` for
/// anything that is not IPv4. "ready" once bound, so the test knows it is listening.
const SNIFFER: &str = r#"
import socket, struct, sys
ifname, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
s.bind((ifname, 3))
f = open(out, "w", buffering=1)
f.write("ready\n")
while True:
    data, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    if len(data) < 20 or data[0] >> 4 != 4:
        f.write("other %d\n" % len(data))
        continue
    ihl = (data[0] & 15) * 4
    proto = data[9]
    sp = dp = 0
    if proto in (6, 17) and len(data) >= ihl + 4:
        sp, dp = struct.unpack("!HH", data[ihl:ihl + 4])
    f.write("%d %s %d %s %d\n" % (proto, socket.inet_ntoa(data[12:16]), sp,
                                  socket.inet_ntoa(data[16:20]), dp))
"#;

/// Sends a few UDP datagrams and tries one TCP connect, optionally from a given source address.
/// Prints `tcp connected` or `tcp failed <error>`; exits non-zero only if it could not even
/// create or bind its sockets.
const PROBE: &str = r#"
import socket, sys
src, dst, udp_port, tcp_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if src != "-":
    u.bind((src, 0))
for i in range(3):
    u.sendto(b"isolation probe %d" % i, (dst, udp_port))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.settimeout(1.0)
if src != "-":
    t.bind((src, 0))
try:
    t.connect((dst, tcp_port))
    print("tcp connected")
except OSError as e:
    print("tcp failed %s" % e)
"#;

/// A registered CVM running wireguard-go in its own namespace with an HTTP server on its
/// tunnel address. Field order is drop order: processes, then the interface, then the namespace.
struct Cvm {
    app: String,
    tunnel_ip: Ipv4Addr,
    ifname: String,
    gateways: BTreeMap<u64, GatewayPeer>,
    _http: Proc,
    _www: tempfile::TempDir,
    /// wireguard-go and its namespace.
    wg: WgGoCvm,
}

impl Cvm {
    /// Creates app `app`, registers one instance, and brings its wireguard-go up in namespace
    /// `ns_name` on interface `ifname`, serving `body` at `/hello.txt`.
    fn start(tc: &TestCluster, app: &str, ns_name: String, ifname: String, body: &str) -> Self {
        let out = tc.cli(&["app", "create", app, "--port", &HTTP_PORT.to_string()]);
        assert!(out.status.success(), "{}", show(&out));
        let cred = format!("cvm-{app}");
        issue_credential(tc, app, &cred);
        let instance = format!("{app}-1");
        let wg_key = format!("{app}-1.wg.key");
        let cfg = agent_config(
            tc,
            &AgentSpec {
                cred: &cred,
                app,
                instance: &instance,
                wg_key: &wg_key,
                expose: &[HTTP_PORT],
                reregister_secs: 30,
            },
        );
        let conf = register_once(&cfg).expect("registration");
        let (address, tunnel_ip) = wg_quick_address(&conf);
        let std::net::IpAddr::V4(tunnel_ip) = tunnel_ip else {
            panic!("IPv4 tunnel address expected: {address}");
        };
        let gateways = gateway_peers(&conf);
        assert_eq!(
            gateways.len(),
            tc.ids().len(),
            "one peer per gateway:\n{conf}"
        );

        let wg = start_wggo_cvm(tc, &conf, ns_name, ifname.clone()).expect("wireguard-go CVM");
        let www = tempfile::tempdir().expect("tempdir");
        std::fs::write(www.path().join("hello.txt"), body).expect("file");
        let http = wggo::http_server(&wg.ns.name, IpAddr::V4(tunnel_ip), HTTP_PORT, www.path())
            .expect("http server");
        Cvm {
            app: app.to_string(),
            tunnel_ip,
            ifname,
            gateways,
            _http: http,
            _www: www,
            wg,
        }
    }

    /// Cryptokey routing: `extra` (a /32) is reachable through gateway `via` only; every other
    /// gateway peer is reset to just its own address.
    fn route_via(&self, via: u64, extra: Ipv4Addr) {
        for (id, g) in &self.gateways {
            let allowed = if *id == via {
                format!("{}/32,{extra}/32", g.tunnel_ip)
            } else {
                format!("{}/32", g.tunnel_ip)
            };
            wggo::run(
                "wg",
                &[
                    "set",
                    &self.ifname,
                    "peer",
                    &g.public_key,
                    "allowed-ips",
                    &allowed,
                ],
            )
            .expect("wg set allowed-ips");
        }
        let shown = wggo::run("wg", &["show", &self.ifname, "allowed-ips"]).expect("wg show");
        let key = &self.gateways[&via].public_key;
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with(key.as_str()) && l.contains(&format!("{extra}/32"))),
            "{extra}/32 is not routed via gateway {via}:\n{shown}"
        );
    }

    /// Peers this CVM directly with `other` (what a forwarding gateway would amount to).
    fn peer_directly(&self, other: &Cvm) {
        // Live values: `wg setconf` replaced wireguard-go's start-up key with the agent's.
        let port = wggo::run("wg", &["show", &other.ifname, "listen-port"]).expect("wg show");
        let key = wggo::run("wg", &["show", &other.ifname, "public-key"]).expect("wg show");
        wggo::run(
            "wg",
            &[
                "set",
                &self.ifname,
                "peer",
                &key,
                "allowed-ips",
                &format!("{}/32", other.tunnel_ip),
                "endpoint",
                &format!("127.0.0.1:{port}"),
            ],
        )
        .expect("wg set direct peer");
    }

    fn unpeer(&self, other: &Cvm) {
        let key = wggo::run("wg", &["show", &other.ifname, "public-key"]).expect("wg show");
        wggo::run("wg", &["set", &self.ifname, "peer", &key, "remove"])
            .expect("wg remove direct peer");
    }

    fn ns_exec(&self, args: &[&str]) -> anyhow::Result<String> {
        ns_exec(&self.wg.ns.name, args)
    }
}

/// GET /hello.txt of `app` through node `id`'s HTTPS edge: the body on success.
fn curl_app(tc: &TestCluster, id: u64, app: &str) -> Option<String> {
    let host = format!("{app}.portcullis.localhost");
    match curl_https(tc, id, &host, "/hello.txt")? {
        (200, body) => Some(body),
        _ => None,
    }
}

/// Every gateway's edge reaches both CVMs (the positive control).
fn every_gateway_reaches(tc: &TestCluster, cvms: &[(&Cvm, &str)], when: &str) {
    for id in tc.ids() {
        for (cvm, body) in cvms {
            let got = wait_for(
                &format!("{when}: node {id} reaches {} at {}", cvm.app, cvm.tunnel_ip),
                Duration::from_secs(30),
                || curl_app(tc, id, &cvm.app),
            );
            assert_eq!(&got, body);
        }
        println!("{when}: node {id} reaches both CVMs");
    }
}

/// One packet B's sniffer saw arrive from the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    proto: u8,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
}

fn parse_seen(line: &str) -> Option<Seen> {
    let f: Vec<&str> = line.split_whitespace().collect();
    Some(Seen {
        proto: f.first()?.parse().ok()?,
        src: f.get(1)?.parse().ok()?,
        sport: f.get(2)?.parse().ok()?,
        dst: f.get(3)?.parse().ok()?,
        dport: f.get(4)?.parse().ok()?,
    })
}

/// The sniffer on B's TUN device; reads its log.
struct Sniffer {
    log: PathBuf,
    _proc: Proc,
}

impl Sniffer {
    fn start(ns: &str, ifname: &str, dir: &Path) -> Self {
        let script = dir.join("sniff.py");
        std::fs::write(&script, SNIFFER).expect("write sniffer");
        let log = dir.join(format!("sniff-{ifname}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(&script)
            .arg(ifname)
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sniffer");
        let s = Sniffer {
            log,
            _proc: Proc(child),
        };
        wait_for("B's sniffer is bound", Duration::from_secs(10), || {
            s.lines()
                .first()
                .is_some_and(|l| l == "ready")
                .then_some(())
        });
        s
    }

    /// Complete lines only: a line the sniffer is still writing is left for the next read.
    fn lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
        // The piece after the last newline: empty, or a partial line.
        lines.pop();
        lines
    }

    /// Packets logged after the first `from` lines. Non-IPv4 packets come back as protocol 255
    /// from 0.0.0.0, which every check below treats as foreign.
    fn since(&self, from: usize) -> Vec<Seen> {
        self.lines()
            .into_iter()
            .skip(from)
            .filter(|l| l != "ready")
            .map(|l| {
                parse_seen(&l).unwrap_or(Seen {
                    proto: 255,
                    src: Ipv4Addr::UNSPECIFIED,
                    sport: 0,
                    dst: Ipv4Addr::UNSPECIFIED,
                    dport: 0,
                })
            })
            .collect()
    }

    fn mark(&self) -> usize {
        self.lines().len()
    }
}

/// Runs the probe inside `cvm`'s namespace; returns its output line.
fn probe(cvm: &Cvm, script: &Path, src: &str, dst: Ipv4Addr, udp: u16, tcp: u16) -> String {
    cvm.ns_exec(&[
        "python3",
        script.to_str().expect("utf8 path"),
        src,
        &dst.to_string(),
        &udp.to_string(),
        &tcp.to_string(),
    ])
    .expect("probe ran")
}

/// Probes until gateway `id`'s `event` counter rises above `before`; asserts every attempt's TCP
/// connect failed. Returns (counter after, probes sent).
fn probe_until_counted(
    tc: &TestCluster,
    id: u64,
    event: &str,
    before: u64,
    mut send: impl FnMut() -> String,
) -> (u64, u32) {
    let mut sent = 0u32;
    let after = wait_for(
        &format!("node {id} counts {event}"),
        Duration::from_secs(30),
        || {
            let out = send();
            sent += 1;
            assert!(
                out.starts_with("tcp failed"),
                "a TCP connect got through (probe {sent} toward node {id}): {out}"
            );
            wg_event(tc, id, event).filter(|v| *v > before)
        },
    );
    (after, sent)
}

#[test]
fn a_cvm_can_neither_reach_nor_impersonate_another_through_a_gateway() {
    if let Some(why) = wggo::skip_reason() {
        eprintln!(
            "SKIPPED a_cvm_can_neither_reach_nor_impersonate_another_through_a_gateway: {why}"
        );
        return;
    }
    let started = Instant::now();
    let tc = TestCluster::up(3);
    let ids = tc.ids();
    let sfx = wggo::suffix();

    phase("two CVMs of two apps, each wireguard-go in its own namespace");
    let a = Cvm::start(
        &tc,
        "isoa",
        format!("pcisoa-{sfx}"),
        format!("pcisoa{sfx}"),
        "hello from A\n",
    );
    let b = Cvm::start(
        &tc,
        "isob",
        format!("pcisob-{sfx}"),
        format!("pcisob{sfx}"),
        "hello from B\n",
    );
    assert_ne!(a.tunnel_ip, b.tunnel_ip);
    println!(
        "A = {} ({}), B = {} ({})",
        a.tunnel_ip, a.app, b.tunnel_ip, b.app
    );
    // Make each namespace's kernel send to the other CVM over the tunnel; which gateway peer
    // carries it is chosen per round by `route_via` (WireGuard allows one peer per prefix).
    a.ns_exec(&[
        "ip",
        "route",
        "add",
        &format!("{}/32", b.tunnel_ip),
        "dev",
        &a.ifname,
    ])
    .expect("route A -> B");
    b.ns_exec(&[
        "ip",
        "route",
        "add",
        &format!("{}/32", a.tunnel_ip),
        "dev",
        &b.ifname,
    ])
    .expect("route B -> A");
    let scripts = tempfile::tempdir().expect("tempdir");
    let probe_py = scripts.path().join("probe.py");
    std::fs::write(&probe_py, PROBE).expect("write probe");
    let sniffer = Sniffer::start(&b.wg.ns.name, &b.ifname, scripts.path());

    phase("positive control: every gateway reaches A and B, and B's sniffer sees that traffic");
    let both = [(&a, "hello from A\n"), (&b, "hello from B\n")];
    every_gateway_reaches(&tc, &both, "before");
    let seen = sniffer.since(0);
    for id in &ids {
        let gw = b.gateways[id].tunnel_ip;
        assert!(
            seen.iter()
                .any(|p| p.src == gw && p.dst == b.tunnel_ip && p.dport == HTTP_PORT),
            "B's sniffer did not see node {id}'s ({gw}) HTTP traffic: {seen:?}"
        );
    }
    println!("B's sniffer saw {} packets from the gateways", seen.len());
    let gateway_ips: Vec<IpAddr> = b.gateways.values().map(|g| g.tunnel_ip).collect();

    phase("detector control: peered directly (what forwarding would amount to), A gets through");
    // Proves the failure signals work: B's sniffer logs packets from A, and A's probe reports a
    // completed TCP connect, when A's packets are actually delivered to B.
    a.peer_directly(&b);
    b.peer_directly(&a);
    let mark = sniffer.mark();
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = probe(&a, &probe_py, "-", b.tunnel_ip, B_UDP_PORT, HTTP_PORT);
        if out.starts_with("tcp connected") {
            break out;
        }
        if Instant::now() > deadline {
            panic!(
                "A does not reach B over a direct peering: {out}\n{}\n{}\nsniffer: {:?}\nA routes: {:?}",
                wggo::run("wg", &["show", &a.ifname]).unwrap_or_default(),
                wggo::run("wg", &["show", &b.ifname]).unwrap_or_default(),
                sniffer.since(mark),
                a.ns_exec(&["ip", "route"]),
            );
        }
        // Poll interval (the handshake with the new peer is under way), as in wait_for.
        std::thread::sleep(Duration::from_millis(50));
    };
    let direct = sniffer.since(mark);
    assert!(
        direct
            .iter()
            .any(|p| p.src == a.tunnel_ip && p.proto == 17 && p.dport == B_UDP_PORT),
        "B's sniffer missed A's datagrams over the direct peering: {direct:?}"
    );
    println!(
        "direct peering: probe says '{out}', B's sniffer logged {} packets from A",
        direct.iter().filter(|p| p.src == a.tunnel_ip).count()
    );
    // Let that connection finish closing before the peering goes, so no retransmission of it
    // wanders through a gateway later and muddies the counters.
    wait_for(
        "the direct control connection is closed on B",
        Duration::from_secs(20),
        || {
            b.ns_exec(&["ss", "-Htn", "dst", &a.tunnel_ip.to_string()])
                .ok()
                .filter(|s| s.trim().is_empty())
        },
    );
    a.unpeer(&b);
    b.unpeer(&a);

    let mut observed: Vec<String> = Vec::new();
    for &id in &ids {
        phase(&format!(
            "A -> B's tunnel IP through gateway {id}: counted as not_for_us, nothing reaches B"
        ));
        // Everything on B's side is ready to accept A through this gateway: only the gateway's
        // refusal to forward can keep A's packets away.
        a.route_via(id, b.tunnel_ip);
        b.route_via(id, a.tunnel_ip);
        let before = wg_event_now(&tc, id, "not_for_us");
        let mark = sniffer.mark();
        let (after, sent) = probe_until_counted(&tc, id, "not_for_us", before, || {
            probe(&a, &probe_py, "-", b.tunnel_ip, B_UDP_PORT, HTTP_PORT)
        });
        // The gateway has the packets (it counted them); a forwarded one would be at B by now.
        std::thread::sleep(ABSENCE_WINDOW);
        let leaked: Vec<Seen> = sniffer
            .since(mark)
            .into_iter()
            .filter(|p| !gateway_ips.contains(&IpAddr::V4(p.src)))
            .collect();
        assert!(
            leaked.is_empty(),
            "packets from outside the gateways reached B through gateway {id}: {leaked:?}"
        );
        let line = format!(
            "node {id}: not_for_us {before} -> {after} after {sent} probe(s) of 3 UDP + 1 TCP SYN"
        );
        println!("{line}");
        observed.push(line);
    }

    phase("A speaks as B: every gateway counts spoofed_source and answers nothing to B");
    a.ns_exec(&[
        "ip",
        "addr",
        "add",
        &format!("{}/32", b.tunnel_ip),
        "dev",
        &a.ifname,
    ])
    .expect("B's address on A");
    // A's kernel now owns B's address, so A -> B would stay local; the gateways' own addresses
    // are the targets, over each gateway's own peer (no AllowedIPs change needed).
    let src_b = b.tunnel_ip.to_string();
    for &id in &ids {
        let IpAddr::V4(gw) = a.gateways[&id].tunnel_ip else {
            panic!("the default pool gives gateways IPv4 addresses")
        };
        let before = wg_event_now(&tc, id, "spoofed_source");
        let mark = sniffer.mark();
        let (after, sent) = probe_until_counted(&tc, id, "spoofed_source", before, || {
            probe(&a, &probe_py, &src_b, gw, SPOOF_UDP_PORT, SPOOF_TCP_PORT)
        });
        std::thread::sleep(ABSENCE_WINDOW);
        // An accepted spoofed SYN or datagram would make the gateway answer B: a RST from the
        // probed port, or ICMP port unreachable.
        let answers: Vec<Seen> = sniffer
            .since(mark)
            .into_iter()
            .filter(|p| {
                !gateway_ips.contains(&IpAddr::V4(p.src))
                    || p.proto == 1
                    || p.sport == SPOOF_TCP_PORT
                    || p.sport == SPOOF_UDP_PORT
            })
            .collect();
        assert!(
            answers.is_empty(),
            "B got answers to A's spoofed packets through gateway {id}: {answers:?}"
        );
        let not_for_us = wg_event_now(&tc, id, "not_for_us");
        let line = format!(
            "node {id}: spoofed_source {before} -> {after} after {sent} probe(s) (not_for_us now {not_for_us})"
        );
        println!("{line}");
        observed.push(line);
    }
    a.ns_exec(&[
        "ip",
        "addr",
        "del",
        &format!("{}/32", b.tunnel_ip),
        "dev",
        &a.ifname,
    ])
    .expect("remove B's address from A");

    phase("positive control again: the gateways still reach both CVMs");
    let mark = sniffer.mark();
    every_gateway_reaches(&tc, &both, "after");
    let fresh = sniffer.since(mark);
    assert!(
        fresh
            .iter()
            .any(|p| gateway_ips.contains(&IpAddr::V4(p.src)) && p.dport == HTTP_PORT),
        "B's sniffer saw no gateway traffic after the attacks: {fresh:?}"
    );
    for line in &observed {
        eprintln!("{line}");
    }
    eprintln!("t83 done in {:?}", started.elapsed());
}
