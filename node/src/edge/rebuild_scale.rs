//! What one state change costs the edge at 65,536 instances in 16,384 apps.
//!
//! Run (release without fat LTO, in a separate target dir):
//!
//! ```sh
//! CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
//!   CARGO_TARGET_DIR=/work/rel-target cargo test --release -p portcullis-node \
//!   rebuild_scale -- --ignored --nocapture
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_raft::state::{App, Certificate, Instance};
use portcullis_raft::store::SharedState;
use portcullis_raft::{ClusterState, Command, Response};

use super::*;
use crate::config::EdgeConfig;

pub(crate) const APPS: usize = 16_384;
pub(crate) const PER_APP: usize = 4;
pub(crate) const BASE: &str = "apps.test";

pub(crate) fn app_name(a: usize) -> String {
    format!("app{a:05}x")
}

pub(crate) fn instance_id(a: usize, k: usize) -> String {
    format!("i{a:05}-{k}x")
}

/// A deterministic, valid WireGuard public key for instance number `n`.
pub(crate) fn wg_key(n: usize) -> String {
    let mut b = [7u8; 32];
    b[..8].copy_from_slice(&(n as u64).to_le_bytes());
    portcullis_wg::PublicKey::from_bytes(b).to_base64()
}

pub(crate) fn instance(a: usize, k: usize) -> Instance {
    let n = a * PER_APP + k;
    let offset = u32::try_from(n + 1).expect("fits");
    Instance {
        instance_id: instance_id(a, k),
        app: app_name(a),
        region: ["us-east", "eu-west", "ap-south"][n % 3].into(),
        wg_public_key: wg_key(n),
        tunnel_ip: Some(IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(100, 64, 0, 0)) + offset,
        ))),
        backend_addr: None,
        registered_at: 1_000,
    }
}

/// `apps` apps with `PER_APP` instances each, mixed policies, and a handful of certificates.
pub(crate) fn big_state(apps: usize) -> ClusterState {
    let mut s = ClusterState::default();
    let policies = ["round-robin", "least-conn", "hash:ip", "geo+least-conn"];
    for a in 0..apps {
        let name = app_name(a);
        s.apps.insert(
            name.clone(),
            App {
                name,
                ports: vec![8080, 9000],
                lb: policies[a % policies.len()].into(),
                revision: 1,
            },
        );
        for k in 0..PER_APP {
            let i = instance(a, k);
            s.instances.insert(i.instance_id.clone(), i);
        }
    }
    s.tunnel_pool.next_offset = (apps * PER_APP) as u64;
    let dir = tempfile::tempdir().expect("tempdir");
    crate::pki::init_dev_ca(dir.path()).expect("dev ca");
    for c in 0..4 {
        let name = format!("*.c{c}.{BASE}");
        let leaf =
            crate::pki::issue_dev_cert(dir.path(), std::slice::from_ref(&name)).expect("leaf");
        s.certificates
            .insert(name.clone(), super::tests::stored_certificate(name, leaf));
    }
    s
}

pub(crate) fn edge(shared: &SharedState) -> Arc<Edge> {
    let cfg = EdgeConfig {
        base_domains: vec![BASE.into()],
        access_log: false,
        ..Default::default()
    };
    Edge::new(
        cfg,
        shared,
        Arc::new(upstream::TcpUpstream),
        Arc::new(EdgeMetrics::default()),
        Arc::new(acme_hook::NoAcme),
    )
    .expect("edge")
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    let mut v: Vec<Duration> = (0..runs).map(|_| f()).collect();
    v.sort();
    v[v.len() / 2]
}

fn register(a: usize, k: usize, at: u64) -> Command {
    Command::RegisterInstanceV2(Instance {
        tunnel_ip: None,
        registered_at: at,
        ..instance(a, k)
    })
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn rebuild_scale_65536_instances() {
    let t = Instant::now();
    let shared = SharedState::detached(big_state(APPS));
    println!(
        "state: {APPS} apps, {} instances, built in {}",
        APPS * PER_APP,
        ms(t.elapsed())
    );
    let t = Instant::now();
    let edge = edge(&shared);
    println!("first Edge::rebuild (in Edge::new): {}", ms(t.elapsed()));

    // A full rebuild, as after a snapshot install.
    let st = {
        let s = shared.read().state.clone();
        shared.replace_detached(s);
        edge.rebuild_timed(&shared)
    };
    assert!(st.full);
    println!(
        "full rebuild (snapshot install): total {}, read lock held {}",
        ms(st.total),
        ms(st.locked)
    );

    // One change, then the rebuild `Edge::watch` runs for it.
    let mut at = 2_000;
    let per_change = |name: &str, mut cmd: Box<dyn FnMut(usize) -> Command>| {
        let mut totals = Vec::new();
        let mut locks = Vec::new();
        for n in 0..21 {
            let r = shared.apply_detached(&cmd(n));
            assert!(!matches!(r, Response::Rejected(_)), "{name}: {r:?}");
            let st = edge.rebuild_timed(&shared);
            assert!(!st.full, "{name}: incremental");
            totals.push(st.total);
            locks.push(st.locked);
        }
        totals.sort();
        locks.sort();
        println!(
            "{name:<32} per change (median of 21): total {}, read lock held {} (max {} / {})",
            ms(totals[10]),
            ms(locks[10]),
            ms(totals[20]),
            ms(locks[20])
        );
    };
    // Apps 0..21 get a fifth instance; every policy is among them.
    per_change(
        "register a new instance",
        Box::new(|n| {
            Command::RegisterInstanceV2(Instance {
                instance_id: instance_id(n, PER_APP),
                wg_public_key: wg_key(10_000_000 + n),
                tunnel_ip: None,
                ..instance(n, 0)
            })
        }),
    );
    per_change(
        "renew an instance",
        Box::new(move |n| {
            at += 1;
            register(100 + n, 1, at)
        }),
    );
    per_change(
        "set an instance weight",
        Box::new(|n| Command::SetInstanceWeight {
            instance_id: instance_id(200 + n, 2),
            weight: 3,
        }),
    );
    per_change(
        "remove an instance",
        Box::new(|n| Command::RemoveInstance {
            instance_id: instance_id(300 + n, 3),
        }),
    );

    // For comparison: what one rebuild cost before it was incremental.
    let locked = median(3, || {
        let applied = shared.read();
        let t = Instant::now();
        let r = route::RouteTable::build(&applied.state, &[BASE.to_string()], 1);
        let b = edge.balancer.build(&applied.state);
        let d = t.elapsed();
        drop(applied);
        drop((r, b));
        d
    });
    let routes = median(3, || {
        let applied = shared.read();
        let t = Instant::now();
        let r = route::RouteTable::build(&applied.state, &[BASE.to_string()], 1);
        let d = t.elapsed();
        drop(applied);
        drop(r);
        d
    });
    println!(
        "whole-state RouteTable::build + Balancer::build: {}",
        ms(locked)
    );
    println!("  of which RouteTable::build: {}", ms(routes));
}

// --- Incremental rebuilds equal full rebuilds. ---

/// The incremental snapshot the edge serves now, and one compiled from the whole state by
/// the same balancer (so health objects compare by identity).
fn dumps(edge: &Edge, shared: &SharedState) -> (String, String) {
    let snap = edge.snapshot();
    let inc = format!(
        "{}\n{}\n{}",
        snap.routes.dump(),
        snap.balance.dump(),
        snap.certs.dump()
    );
    let applied = shared.read();
    let s = &applied.state;
    let routes = route::RouteTable::build(s, &[BASE.to_string()], snap.routes.applied_index);
    let balance = edge
        .balancer
        .compile(&routes, balance::weights_of(s), edge.balancer.regions(s));
    let (certs, _) = CertTable::build(&s.certificates, Some(&snap.certs), &edge.keyring);
    let full = format!("{}\n{}\n{}", routes.dump(), balance.dump(), certs.dump());
    (inc, full)
}

fn assert_incremental_is_full(edge: &Edge, shared: &SharedState, what: &str) {
    let st = edge.rebuild_timed(shared);
    assert!(!st.full, "{what}: expected an incremental rebuild");
    let (inc, full) = dumps(edge, shared);
    if inc != full {
        let diff: Vec<_> = inc
            .lines()
            .zip(full.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .collect();
        panic!("{what}: incremental and full rebuilds differ: {diff:#?}");
    }
}

/// A small deterministic generator (the test must be reproducible, not clever).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

struct Universe {
    certs: Vec<Certificate>,
}

impl Universe {
    fn new() -> Universe {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::pki::init_dev_ca(dir.path()).expect("dev ca");
        let mut certs = Vec::new();
        for name in ["*.c0.apps.test", "c1.apps.test", "*.c2.apps.test"] {
            for version in 0..2u64 {
                let leaf =
                    crate::pki::issue_dev_cert(dir.path(), &[name.to_string()]).expect("leaf");
                certs.push(Certificate {
                    name: name.into(),
                    names: vec![name.into(), "shared.apps.test".into()],
                    chain_pem: leaf.cert_pem,
                    key: leaf.key_pem.into_bytes(),
                    key_encryption: "none".into(),
                    not_after: 10 + version,
                    issuer: "test".into(),
                });
            }
        }
        // One that never loads: it must be reported once and not take a working one away.
        certs.push(Certificate {
            chain_pem: "not a certificate".into(),
            ..certs[0].clone()
        });
        Universe { certs }
    }

    fn command(&self, r: &mut Lcg) -> Command {
        const APPS: [&str; 6] = ["a0x", "a1x", "a2x", "a3x", "a4x", "shop"];
        const IDS: [&str; 12] = [
            "i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8", "Ab1", "ab1", "AB1", "web-9000",
        ];
        const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
        const DOMAINS: [&str; 3] = ["x.example.org", "y.example.org", "z.example.net"];
        let policies = [
            "round-robin",
            "least-conn",
            "hash:ip",
            "geo",
            "geo+least-conn",
        ];
        let ports: [&[u16]; 3] = [&[80], &[80, 8080], &[9000, 80]];
        match r.below(16) {
            0 | 1 => Command::CreateApp {
                name: r.pick(&APPS).to_string(),
                ports: r.pick(&ports).to_vec(),
                lb: r.pick(&policies).to_string(),
            },
            2 => Command::DeleteApp {
                name: r.pick(&APPS).to_string(),
            },
            3..=6 => {
                let id = r.pick(&IDS).to_string();
                Command::RegisterInstanceV2(Instance {
                    instance_id: id,
                    app: r.pick(&APPS).to_string(),
                    region: r.pick(&REGIONS).to_string(),
                    wg_public_key: wg_key(1_000_000 + r.below(20)),
                    tunnel_ip: None,
                    backend_addr: [None, Some("10.0.0.1".to_string())][r.below(2)].clone(),
                    registered_at: r.below(3) as u64,
                })
            }
            7 => Command::RemoveInstance {
                instance_id: r.pick(&IDS).to_string(),
            },
            8 => Command::ExpireInstances(vec![portcullis_raft::state::StaleInstance {
                instance_id: r.pick(&IDS).to_string(),
                registered_at: r.below(3) as u64,
            }]),
            9 => Command::SetInstanceWeight {
                instance_id: r.pick(&IDS).to_string(),
                weight: r.below(4) as u32,
            },
            10 => Command::AddDomain(portcullis_raft::state::Domain {
                name: r.pick(&DOMAINS).to_string(),
                app: r.pick(&APPS).to_string(),
                port: *r.pick(&[80, 8080, 9000]),
                token: "t".into(),
                verified: false,
                passthrough: r.below(2) == 1,
            }),
            11 => Command::VerifyDomain {
                name: r.pick(&DOMAINS).to_string(),
            },
            12 => Command::RemoveDomain {
                name: r.pick(&DOMAINS).to_string(),
            },
            13 => match r.below(3) {
                0 => Command::RemoveCertificate {
                    name: r.pick(&self.certs).name.clone(),
                },
                _ => Command::PutCertificate(r.pick(&self.certs).clone()),
            },
            14 => Command::UpsertRegion(portcullis_raft::state::Region {
                name: r.pick(&REGIONS).to_string(),
                latitude: r.below(90) as f64,
                longitude: r.below(180) as f64,
            }),
            _ => Command::Batch((0..1 + r.below(3)).map(|_| self.command(r)).collect()),
        }
    }
}

/// Random sequences of every command that changes what the edge serves (registrations,
/// renewals, removals, expiries, weights, apps deleted and re-created with other ports or
/// policies, domain claims, certificates, regions, instance ids differing only in case):
/// after each rebuild, the incrementally compiled snapshot equals one compiled from scratch.
#[test]
fn incremental_rebuild_equals_full_rebuild() {
    let u = Universe::new();
    let shared = SharedState::detached(big_state(24));
    let edge = edge(&shared);
    let mut r = Lcg(7);
    let mut seen = [false; 5];
    for step in 0..400 {
        let n = 1 + r.below(3);
        let cmds: Vec<Command> = (0..n).map(|_| u.command(&mut r)).collect();
        for c in &cmds {
            shared.apply_detached(c);
        }
        assert_incremental_is_full(&edge, &shared, &format!("step {step}: {cmds:?}"));
        let a = shared.read();
        let s = &a.state;
        let lower: std::collections::BTreeSet<_> =
            s.instances.keys().map(|k| k.to_ascii_lowercase()).collect();
        for (i, hit) in [
            s.domains.values().any(|d| d.verified),
            !s.instance_weights.is_empty(),
            lower.len() < s.instances.len(),
            s.apps
                .values()
                .any(|a| a.lb.starts_with("geo") && a.name.len() == 3)
                && s.instances.values().any(|i| i.app.len() == 3),
            edge.snapshot().certs.dump().contains("not a certificate"),
        ]
        .into_iter()
        .enumerate()
        {
            seen[i] |= hit;
        }
    }
    // The sequence reached the interesting cases: a verified custom domain, a weight, ids
    // that differ only in case, a geo app with instances, a certificate that does not load.
    assert_eq!(seen, [true; 5]);
}

/// Targeted: what a renewal, a registration and a removal rebuild, and what they share.
#[test]
fn incremental_rebuild_shares_untouched_apps() {
    let shared = SharedState::detached(big_state(16));
    let edge = edge(&shared);
    let before = edge.snapshot();
    let sel = |s: &Snapshot, a: usize| s.balance.selector_arc(&app_name(a)).cloned();

    // A renewal changes nothing the data plane sees: every selector and route is shared.
    shared.apply_detached(&register(3, 1, 5_000));
    assert_incremental_is_full(&edge, &shared, "renewal");
    let after = edge.snapshot();
    for a in 0..16 {
        let (x, y) = (sel(&before, a).expect("x"), sel(&after, a).expect("y"));
        assert!(
            Arc::ptr_eq(&x, &y),
            "app {a} selector shared after a renewal"
        );
    }

    // A new instance rebuilds its own app's selector only.
    shared.apply_detached(&Command::RegisterInstanceV2(Instance {
        instance_id: instance_id(5, 9),
        wg_public_key: wg_key(999),
        tunnel_ip: None,
        ..instance(5, 0)
    }));
    assert_incremental_is_full(&edge, &shared, "registration");
    let next = edge.snapshot();
    for a in 0..16 {
        let (x, y) = (sel(&after, a).expect("x"), sel(&next, a).expect("y"));
        assert_eq!(Arc::ptr_eq(&x, &y), a != 5, "app {a}");
    }
    let route = next
        .routes
        .resolve(&format!("{}.{BASE}", app_name(5)))
        .expect("route");
    let picks = balance::candidates(
        &next,
        &edge.balancer,
        &route,
        [192, 0, 2, 1].into(),
        None,
        9,
    )
    .expect("candidates");
    assert_eq!(picks.len(), PER_APP + 1);

    // Load counters and health survive an incremental rebuild of the instance's app.
    let victim = instance_id(5, 1);
    let load = picks
        .iter()
        .find(|c| c.backend.instance_id == victim)
        .and_then(|c| c.load.clone())
        .expect("load");
    let _guard = load.acquire();
    next.balance
        .health(&victim)
        .expect("health")
        .record_connect_failure(1);
    shared.apply_detached(&Command::RemoveInstance {
        instance_id: instance_id(5, 9),
    });
    assert_incremental_is_full(&edge, &shared, "removal");
    let last = edge.snapshot();
    assert!(!last.balance.is_healthy(&victim), "health kept");
    let kept = last
        .balance
        .selector(&app_name(5))
        .expect("selector")
        .backends()
        .iter()
        .find(|b| b.id == victim)
        .map(|b| b.load.get());
    assert_eq!(kept, Some(1), "load kept");
    assert!(last.routes.instance(&instance_id(5, 9)).is_none());
    assert!(last.balance.health(&instance_id(5, 9)).is_none());

    // A replaced state (snapshot install) is compiled in full, and equals it too.
    let s = shared.read().state.clone();
    shared.replace_detached(s);
    assert!(edge.rebuild_timed(&shared).full);
    let (inc, full) = dumps(&edge, &shared);
    assert_eq!(inc, full);
}
