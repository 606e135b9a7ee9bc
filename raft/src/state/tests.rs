use proptest::prelude::*;

use super::*;
use std::collections::BTreeSet;
use std::net::IpAddr;

fn app_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("web".to_string()),
        Just("api".to_string()),
        Just("db".to_string()),
        "[a-z]{1,4}",
        Just("bad-80".to_string()),
        Just("".to_string())
    ]
}

pub(crate) fn command() -> impl Strategy<Value = Command> {
    let leaf = prop_oneof![
        (
            app_name(),
            proptest::collection::vec(any::<u16>(), 0..4),
            prop_oneof![
                Just("round-robin".to_string()),
                Just("hash:ip".to_string()),
                Just("nope".to_string())
            ]
        )
            .prop_map(|(name, ports, lb)| Command::CreateApp { name, ports, lb }),
        app_name().prop_map(|name| Command::DeleteApp { name }),
        // Old-shape entries (as in logs written before IPv6 pools) and the current shape.
        (app_name(), "[a-z0-9]{1,3}", "[A-Za-z0-9+/]{0,4}").prop_map(|(app, id, key)| {
            Command::RegisterInstance(InstanceV1 {
                instance_id: id,
                app,
                region: "us-east".into(),
                wg_public_key: key,
                ..Default::default()
            })
        }),
        (app_name(), "[a-z0-9]{1,3}", "[A-Za-z0-9+/]{0,4}").prop_map(|(app, id, key)| {
            Command::RegisterInstanceV2(Instance {
                instance_id: id,
                app,
                region: "us-east".into(),
                wg_public_key: key,
                ..Default::default()
            })
        }),
        // This build's shapes: namespace-checked apps and registrations.
        (app_name(), proptest::collection::vec(1u16..4, 1..3)).prop_map(|(name, mut ports)| {
            ports.sort_unstable();
            ports.dedup();
            Command::CreateAppV2 {
                name,
                ports,
                lb: "round-robin".into(),
            }
        }),
        (
            app_name(),
            names::tests::instance_id(),
            "[A-Za-z0-9+/]{0,2}",
            any::<(bool, bool)>(),
            0u32..3
        )
            .prop_map(|(app, instance_id, key, (prefix, rekey), cap)| {
                Command::RegisterInstanceV3(Registration {
                    instance: Instance {
                        instance_id,
                        app,
                        region: "us-east".into(),
                        wg_public_key: key,
                        ..Default::default()
                    },
                    policy: RegistrationPolicy {
                        require_app_prefix: prefix,
                        allow_rekey: rekey,
                        max_instances_per_app: cap,
                    },
                })
            }),
        // Pool changes: IPv4 and IPv6, tiny ranges (exhaustion), the current one, and ranges
        // that validation refuses.
        prop_oneof![
            Just(("fd00:1::", 64u8)),
            Just(("fd00:2::", 126)),
            Just(("10.9.0.0", 30)),
            Just(("100.64.0.0", 10)),
            Just(("198.18.0.0", 16)),
            Just(("fd00:1::5", 64)),
        ]
        .prop_map(|(base, prefix_len)| Command::SetTunnelPool {
            base: base.parse().expect("ip"),
            prefix_len,
        }),
        "[a-z0-9]{1,3}".prop_map(|instance_id| Command::RemoveInstance { instance_id }),
        // Stamps 0 and 1: generated registrations carry 0, so some expiries match, some are stale.
        proptest::collection::vec(("[a-z0-9]{1,3}", 0u64..2), 0..3).prop_map(|v| {
            Command::ExpireInstances(
                v.into_iter()
                    .map(|(instance_id, registered_at)| StaleInstance {
                        instance_id,
                        registered_at,
                    })
                    .collect(),
            )
        }),
        (
            "[a-z]{1,2}",
            proptest::option::of("[a-z]{1,2}"),
            "[a-z]{1,2}"
        )
            .prop_map(|(key, expect, value)| Command::CasRegister { key, expect, value }),
        (any::<u64>(), -100.0f64..100.0).prop_map(|(id, lat)| Command::UpsertNode(GatewayNode {
            id: id % 4,
            region: "eu-west".into(),
            latitude: lat,
            ..Default::default()
        })),
        (any::<u64>()).prop_map(|id| Command::RemoveNode { id: id % 4 }),
        // ACME lease and fenced writes (issue 6): small node ids, clocks and tokens so grants,
        // renewals, expiries and stale writes all occur.
        (1u64..4, 0u64..5000, 1u64..3000).prop_map(|(node, now_ms, ttl_ms)| {
            Command::Acme(AcmeCommand::AcquireLease {
                node,
                now_ms,
                ttl_ms,
            })
        }),
        (1u64..4, 0u64..4).prop_map(|(node, fencing)| {
            Command::Acme(AcmeCommand::ReleaseLease { node, fencing })
        }),
        (0u64..4, "[a-z]{1,2}").prop_map(|(fencing, token)| {
            Command::Acme(AcmeCommand::PutChallenge {
                fencing,
                challenge: Http01Challenge {
                    key_authorization: format!("{token}.th"),
                    token,
                    name: "a.example.com".into(),
                    created_at: 0,
                },
            })
        }),
        (0u64..4, "[a-z]{1,2}", 0usize..3).prop_map(|(fencing, token, kind)| {
            let kind = [
                ChallengeKind::Http01,
                ChallengeKind::TlsAlpn01,
                ChallengeKind::Dns01,
            ][kind];
            Command::Acme(AcmeCommand::PutTypedChallenge {
                fencing,
                challenge: AcmeChallenge {
                    key_authorization: format!("{token}.th"),
                    token,
                    name: "a.example.com".into(),
                    created_at: 0,
                    kind,
                },
            })
        }),
        (0u64..4, "[a-z]{1,2}").prop_map(|(fencing, token)| {
            Command::Acme(AcmeCommand::RemoveChallenge { fencing, token })
        }),
        (0u64..4, any::<u64>()).prop_map(|(fencing, not_after)| {
            Command::Acme(AcmeCommand::PutCertificate {
                fencing,
                cert: Certificate {
                    name: "a.example.com".into(),
                    not_after,
                    ..Default::default()
                },
            })
        }),
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..3),
            proptest::collection::vec(any::<u8>(), 0..3)
        )
            .prop_map(|(cert, old, new)| {
                Command::RewrapKeys(vec![Rewrap {
                    target: if cert {
                        RewrapTarget::Certificate("a.example.com".into())
                    } else {
                        RewrapTarget::AcmeAccount
                    },
                    old,
                    new,
                    scheme: "aes-256-gcm:00".into(),
                }])
            }),
    ];
    prop_oneof![4 => leaf.clone(), 1 => proptest::collection::vec(leaf, 0..4).prop_map(Command::Batch)]
}

proptest! {
    /// Determinism: two replicas that apply the same entries end up equal and answer equally.
    #[test]
    fn same_commands_same_state(cmds in proptest::collection::vec(command(), 0..60)) {
        let mut a = ClusterState::default();
        let mut b = ClusterState::default();
        for (i, c) in cmds.iter().enumerate() {
            let ra = a.apply(i as u64 + 1, c);
            let rb = b.apply(i as u64 + 1, c);
            prop_assert_eq!(ra, rb);
        }
        prop_assert_eq!(&a, &b);
    }

    /// Snapshot then restore gives an equal state.
    #[test]
    fn snapshot_roundtrip(cmds in proptest::collection::vec(command(), 0..60)) {
        let mut a = ClusterState::default();
        for (i, c) in cmds.iter().enumerate() {
            a.apply(i as u64 + 1, c);
        }
        let bytes = bincode::serialize(&a).expect("serialize");
        let b: ClusterState = bincode::deserialize(&bytes).expect("deserialize");
        prop_assert_eq!(a, b);
    }

    /// Tunnel IPs stay unique whatever the sequence of registrations and removals.
    #[test]
    fn tunnel_ips_unique(cmds in proptest::collection::vec(command(), 0..80)) {
        let mut s = ClusterState::default();
        s.apply(0, &Command::CreateApp { name: "web".into(), ports: vec![80], lb: "round-robin".into() });
        for (i, c) in cmds.iter().enumerate() {
            s.apply(i as u64 + 1, c);
            let ips: Vec<_> = s.instances.values().filter_map(|i| i.tunnel_ip).collect();
            let set: BTreeSet<_> = ips.iter().collect();
            prop_assert_eq!(ips.len(), set.len());
            // The pool changes only while nobody holds an address, so every held address is
            // inside the current range and counted by it.
            prop_assert!(ips.iter().all(|ip| s.tunnel_pool.contains(*ip)));
            prop_assert_eq!(s.tunnel_pool.allocated(), ips.len() as u64);
        }
    }

    /// Arbitrary bytes fed as a log entry payload decode to an error, never a panic.
    #[test]
    fn garbage_entries_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(cmd) = bincode::deserialize::<Command>(&bytes) {
            let mut s = ClusterState::default();
            let _ = s.apply(1, &cmd);
        }
    }
}

#[test]
fn app_names() {
    for ok in ["web", "my-app", "a1", "x-y-z", "app-v2"] {
        assert!(validate_app_name(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "-a",
        "a-",
        "My",
        "a_b",
        "web-8080",
        "web-443s",
        "web-50051g",
        &"a".repeat(64),
    ] {
        assert!(validate_app_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn lb_grammar() {
    for ok in [
        "round-robin",
        "least-conn",
        "hash:ip",
        "hash:header=X-User",
        "hash:cookie=sid",
        "geo",
        "geo+least-conn",
        "geo+hash:ip",
    ] {
        assert!(validate_lb(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "random",
        "hash:",
        "hash:header=",
        "geo+geo",
        "geo+",
        "hash:cookie=a b",
    ] {
        assert!(validate_lb(bad).is_err(), "{bad}");
    }
}

/// A state holding app `web` (port 80), created at index 1.
fn with_web_app() -> ClusterState {
    let mut s = ClusterState::default();
    s.apply(
        1,
        &Command::CreateApp {
            name: "web".into(),
            ports: vec![80],
            lb: "round-robin".into(),
        },
    );
    s
}

#[test]
fn create_twice_is_rejected_and_changes_nothing() {
    let mut s = ClusterState::default();
    let c = Command::CreateApp {
        name: "web".into(),
        ports: vec![80, 8080],
        lb: "round-robin".into(),
    };
    assert!(matches!(s.apply(1, &c), Response::App(_)));
    let before = s.clone();
    assert!(matches!(s.apply(2, &c), Response::Rejected(_)));
    assert_eq!(before, s);
}

#[test]
fn instance_ip_is_sticky_and_reused() {
    let mut s = with_web_app();
    let reg = |id: &str, key: &str| {
        Command::RegisterInstanceV2(Instance {
            instance_id: id.into(),
            app: "web".into(),
            region: "r".into(),
            wg_public_key: key.into(),
            ..Default::default()
        })
    };
    let ip = |r: Response| match r {
        Response::InstanceV2(i) => i.tunnel_ip,
        other => panic!("unexpected {other:?}"),
    };
    let a = ip(s.apply(2, &reg("a", "ka")));
    let a2 = ip(s.apply(3, &reg("a", "ka")));
    assert_eq!(a, a2, "re-registration keeps the address");
    assert_eq!(a, Some(IpAddr::from([100, 64, 0, 1])));
    assert!(
        matches!(s.apply(4, &reg("b", "ka")), Response::Rejected(_)),
        "duplicate key refused"
    );
    s.apply(
        5,
        &Command::RemoveInstance {
            instance_id: "a".into(),
        },
    );
    assert_eq!(ip(s.apply(6, &reg("c", "kc"))), a, "freed address reused");
}

#[test]
fn expiry_removes_only_what_was_seen_stale() {
    let mut s = with_web_app();
    let reg = |id: &str, key: &str, at: u64| {
        Command::RegisterInstanceV2(Instance {
            instance_id: id.into(),
            app: "web".into(),
            region: "r".into(),
            wg_public_key: key.into(),
            registered_at: at,
            ..Default::default()
        })
    };
    s.apply(2, &reg("a", "ka", 100));
    s.apply(3, &reg("b", "kb", 100));
    // An operator-registered backend (no WireGuard key) is never expired.
    s.apply(
        4,
        &Command::RegisterInstanceV2(Instance {
            instance_id: "plain".into(),
            app: "web".into(),
            region: "r".into(),
            backend_addr: Some("127.0.0.1:1".into()),
            registered_at: 100,
            ..Default::default()
        }),
    );
    let a_ip = s.instances["a"].tunnel_ip;
    // b re-registered after the proposer looked: its newer stamp saves it.
    s.apply(5, &reg("b", "kb", 200));
    let stale = |id: &str| StaleInstance {
        instance_id: id.into(),
        registered_at: 100,
    };
    let r = s.apply(
        6,
        &Command::ExpireInstances(vec![stale("a"), stale("b"), stale("plain"), stale("gone")]),
    );
    assert_eq!(r, Response::Expired(1));
    assert!(!s.instances.contains_key("a"));
    assert!(s.instances.contains_key("b"));
    assert!(s.instances.contains_key("plain"));
    // a's address went back to the pool.
    s.apply(7, &reg("c", "kc", 300));
    assert_eq!(s.instances["c"].tunnel_ip, a_ip);
    // Too many in one entry is refused whole.
    let many = (0..=MAX_EXPIRE_BATCH)
        .map(|i| stale(&format!("i{i}")))
        .collect();
    assert!(matches!(
        s.apply(8, &Command::ExpireInstances(many)),
        Response::Rejected(_)
    ));
}

#[test]
fn cas_register() {
    let mut s = ClusterState::default();
    let w = |expect: Option<&str>, v: &str| Command::CasRegister {
        key: "k".into(),
        expect: expect.map(Into::into),
        value: v.into(),
    };
    assert!(matches!(s.apply(1, &w(None, "1")), Response::Register(_)));
    assert!(matches!(
        s.apply(2, &w(Some("0"), "2")),
        Response::Rejected(_)
    ));
    assert!(matches!(
        s.apply(3, &w(Some("1"), "2")),
        Response::Register(_)
    ));
    assert_eq!(s.registers["k"].value, "2");
}

#[test]
fn domain_verification_is_bound_to_the_claim_it_checked() {
    let mut s = with_web_app();
    let claim = |token: &str| {
        Command::AddDomain(Domain {
            name: "api.example.org".into(),
            app: "web".into(),
            port: 80,
            token: token.into(),
            ..Default::default()
        })
    };
    s.apply(2, &claim("t-old"));
    // The claim is removed and made again while a verify for the old one is in flight.
    s.apply(
        3,
        &Command::RemoveDomain {
            name: "api.example.org".into(),
        },
    );
    s.apply(4, &claim("t-new"));
    let stale = Command::VerifyDomainClaim {
        name: "api.example.org".into(),
        token: "t-old".into(),
    };
    assert!(matches!(s.apply(5, &stale), Response::Rejected(_)));
    assert!(!s.domains["api.example.org"].verified);
    let fresh = Command::VerifyDomainClaim {
        name: "api.example.org".into(),
        token: "t-new".into(),
    };
    assert_eq!(s.apply(6, &fresh), Response::Ok);
    assert!(s.domains["api.example.org"].verified);
}

#[test]
fn instance_weights_follow_their_instance() {
    let mut s = with_web_app();
    s.apply(
        2,
        &Command::RegisterInstanceV2(Instance {
            instance_id: "a".into(),
            app: "web".into(),
            region: "r".into(),
            backend_addr: Some("127.0.0.1:1".into()),
            ..Default::default()
        }),
    );
    let set = |weight| Command::SetInstanceWeight {
        instance_id: "a".into(),
        weight,
    };
    assert_eq!(s.apply(3, &set(5)), Response::Ok);
    assert_eq!(s.instance_weights.get("a"), Some(&5));
    // Back to the default: nothing stored.
    assert_eq!(s.apply(4, &set(1)), Response::Ok);
    assert!(s.instance_weights.is_empty());
    assert!(matches!(s.apply(5, &set(10_001)), Response::Rejected(_)));
    let unknown = Command::SetInstanceWeight {
        instance_id: "b".into(),
        weight: 2,
    };
    assert!(matches!(s.apply(6, &unknown), Response::Rejected(_)));
    s.apply(7, &set(0));
    s.apply(
        8,
        &Command::RemoveInstance {
            instance_id: "a".into(),
        },
    );
    assert!(
        s.instance_weights.is_empty(),
        "a removed instance leaves no weight"
    );
}

#[test]
fn rewrap_replaces_only_the_value_the_proposer_saw() {
    let mut s = ClusterState::default();
    let cert = |name: &str, key: &[u8]| Certificate {
        name: name.into(),
        key: key.to_vec(),
        key_encryption: "aes-256-gcm:old".into(),
        ..Default::default()
    };
    s.apply(1, &Command::PutCertificate(cert("a.test", b"sealed-a")));
    s.apply(2, &Command::PutCertificate(cert("b.test", b"sealed-b")));
    s.acme.account = Some(AcmeAccount {
        directory: "https://ca/dir".into(),
        credentials: "sealed-acct".into(),
        encryption: "aes-256-gcm:old".into(),
    });
    let rewrap = |target: RewrapTarget, old: &[u8], new: &[u8]| Rewrap {
        target,
        old: old.to_vec(),
        new: new.to_vec(),
        scheme: "aes-256-gcm:new".into(),
    };
    // b was renewed after the proposer read it: its newer key must survive.
    s.apply(3, &Command::PutCertificate(cert("b.test", b"renewed-b")));
    let cmd = Command::RewrapKeys(vec![
        rewrap(
            RewrapTarget::Certificate("a.test".into()),
            b"sealed-a",
            b"new-a",
        ),
        rewrap(
            RewrapTarget::Certificate("b.test".into()),
            b"sealed-b",
            b"new-b",
        ),
        rewrap(RewrapTarget::Certificate("gone.test".into()), b"x", b"y"),
        rewrap(RewrapTarget::AcmeAccount, b"sealed-acct", b"new-acct"),
    ]);
    assert_eq!(cmd.validate(), Ok(()));
    assert_eq!(s.apply(4, &cmd), Response::Rewrapped(2));
    assert_eq!(s.certificates["a.test"].key, b"new-a");
    assert_eq!(s.certificates["a.test"].key_encryption, "aes-256-gcm:new");
    assert_eq!(s.certificates["b.test"].key, b"renewed-b");
    assert_eq!(s.certificates["b.test"].key_encryption, "aes-256-gcm:old");
    let acct = s.acme.account.as_ref().expect("account");
    assert_eq!(
        (acct.credentials.as_str(), acct.encryption.as_str()),
        ("new-acct", "aes-256-gcm:new")
    );
    // Empty replacement values and oversized batches are refused before proposing.
    let empty = Command::RewrapKeys(vec![rewrap(RewrapTarget::AcmeAccount, b"a", b"")]);
    assert!(empty.validate().is_err());
    let many = Command::RewrapKeys(vec![
        rewrap(RewrapTarget::AcmeAccount, b"a", b"b");
        MAX_REWRAP_BATCH + 1
    ]);
    assert!(many.validate().is_err());
}

/// A registration entry exactly as builds before IPv6 pools wrote it to the log, byte by byte
/// (bincode: u32 variant index, u64-length strings, `Option` tag, `Ipv4Addr` as 4 bytes).
fn old_register_entry(id: &str, key: &str, tunnel_ip: Option<[u8; 4]>) -> Vec<u8> {
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    let mut b = 6u32.to_le_bytes().to_vec(); // Command::RegisterInstance, the 7th variant
    string(&mut b, id);
    string(&mut b, "web");
    string(&mut b, "r");
    string(&mut b, key);
    match tunnel_ip {
        Some(ip) => {
            b.push(1);
            b.extend(ip);
        }
        None => b.push(0),
    }
    b.push(1); // backend_addr: Some("10.0.0.1:80")
    string(&mut b, "10.0.0.1:80");
    b.extend(1234u64.to_le_bytes());
    b
}

#[test]
fn old_register_entries_decode_and_apply() {
    let bytes = old_register_entry("a", "ka", None);
    let cmd: Command = bincode::deserialize(&bytes).expect("old entry decodes");
    let Command::RegisterInstance(v1) = &cmd else {
        panic!("decoded as {cmd:?}");
    };
    assert_eq!(v1.instance_id, "a");
    assert_eq!(v1.backend_addr.as_deref(), Some("10.0.0.1:80"));
    assert_eq!(v1.registered_at, 1234);
    // The legacy struct encodes to the same bytes: the frozen shape is the old one.
    assert_eq!(bincode::serialize(&cmd).expect("encode"), bytes);
    // An address in the entry (proposers never set one; apply allocates) decodes too.
    let with_ip: Command =
        bincode::deserialize(&old_register_entry("b", "kb", Some([100, 64, 0, 9])))
            .expect("decodes");
    assert!(matches!(&with_ip, Command::RegisterInstance(i)
        if i.tunnel_ip == Some(std::net::Ipv4Addr::new(100, 64, 0, 9))));

    let mut s = with_web_app();
    // Answered in the old shape, so an older forwarding node can read it.
    match s.apply(2, &cmd) {
        Response::Instance(i) => {
            assert_eq!(i.tunnel_ip, Some(std::net::Ipv4Addr::new(100, 64, 0, 1)))
        }
        other => panic!("unexpected {other:?}"),
    }
    let stored = &s.instances["a"];
    assert_eq!(stored.tunnel_ip, Some(IpAddr::from([100, 64, 0, 1])));
    assert_eq!(stored.registered_at, 1234);
    // The same instance renewed with the new command keeps its address.
    let v2 = Command::RegisterInstanceV2(Instance::from(v1.clone()));
    assert!(matches!(s.apply(3, &v2), Response::InstanceV2(i)
        if i.tunnel_ip == Some(IpAddr::from([100, 64, 0, 1]))));
}

fn set_pool(cidr: &str) -> Command {
    let (base, prefix_len) = TunnelPool::parse_cidr(cidr).expect(cidr);
    Command::SetTunnelPool { base, prefix_len }
}

fn register(id: &str, key: &str) -> Command {
    Command::RegisterInstanceV2(Instance {
        instance_id: id.into(),
        app: "web".into(),
        region: "r".into(),
        wg_public_key: key.into(),
        ..Default::default()
    })
}

fn ip_of(r: Response) -> IpAddr {
    match r {
        Response::InstanceV2(Instance {
            tunnel_ip: Some(ip),
            ..
        }) => ip,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn ipv6_pool_allocates_sticky_and_reuses() {
    let mut s = with_web_app();
    assert_eq!(s.apply(2, &set_pool("fd00:1::/64")), Response::Ok);
    assert_eq!(s.tunnel_pool.to_string(), "fd00:1::/64");
    let a = ip_of(s.apply(3, &register("a", "ka")));
    assert_eq!(a, "fd00:1::1".parse::<IpAddr>().expect("ip"));
    assert_eq!(ip_of(s.apply(4, &register("a", "ka"))), a, "sticky");
    let b = ip_of(s.apply(5, &register("b", "kb")));
    assert_eq!(b, "fd00:1::2".parse::<IpAddr>().expect("ip"));
    assert_eq!(s.tunnel_pool.allocated(), 2);
    s.apply(
        6,
        &Command::RemoveInstance {
            instance_id: "a".into(),
        },
    );
    assert_eq!(s.tunnel_pool.allocated(), 1);
    assert_eq!(
        ip_of(s.apply(7, &register("c", "kc"))),
        a,
        "lowest freed first"
    );
    // An old-shape registration cannot carry an IPv6 address: refused, nothing changes.
    let before = s.clone();
    let old = Command::RegisterInstance(InstanceV1 {
        instance_id: "d".into(),
        app: "web".into(),
        region: "r".into(),
        ..Default::default()
    });
    assert!(matches!(s.apply(8, &old), Response::Rejected(m) if m.contains("upgrade")));
    assert_eq!(before, s);
}

#[test]
fn pool_change_is_refused_while_addresses_are_held() {
    let mut s = with_web_app();
    s.apply(2, &register("a", "ka"));
    let before = s.clone();
    match s.apply(3, &set_pool("fd00:1::/64")) {
        Response::Rejected(m) => {
            assert!(m.contains("strand"), "{m}");
            assert!(m.contains("\"a\""), "{m}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(before, s);
    // Setting the current range again is a harmless no-op.
    assert_eq!(s.apply(4, &set_pool("100.64.0.0/10")), Response::Ok);
    assert_eq!(before, s);
    s.apply(
        5,
        &Command::RemoveInstance {
            instance_id: "a".into(),
        },
    );
    assert_eq!(s.apply(6, &set_pool("fd00:1::/64")), Response::Ok);
    // Invalid ranges never reach the state, even from a hostile proposer.
    let bad = Command::SetTunnelPool {
        base: "fd70:6f72:7463::".parse().expect("ip"),
        prefix_len: 64,
    };
    assert!(bad.validate().is_err());
    assert!(matches!(s.apply(7, &bad), Response::Rejected(m) if m.contains("gateway")));
    assert_eq!(s.tunnel_pool.to_string(), "fd00:1::/64");
}

#[test]
fn small_pool_exhausts_with_a_clear_message() {
    let mut s = with_web_app();
    s.apply(2, &set_pool("fd00:2::/126"));
    ip_of(s.apply(3, &register("a", "ka")));
    ip_of(s.apply(4, &register("b", "kb")));
    match s.apply(5, &register("c", "kc")) {
        Response::Rejected(m) => assert!(m.contains("fd00:2::/126 exhausted"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
}
