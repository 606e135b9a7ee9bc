use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proptest::prelude::*;

use super::*;
use crate::lookup::{Location, Precision};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn regions() -> Vec<Region> {
    vec![
        Region::new("us-east", 38.95, -77.45).expect("valid"),
        Region::new("eu-west", 53.35, -6.26).expect("valid"),
        Region::new("ap-northeast", 35.68, 139.65).expect("valid"),
    ]
}

/// Two backends per region, plus one in a region nobody configured.
fn fleet() -> Vec<Backend> {
    let mut v = Vec::new();
    for r in ["us-east", "eu-west", "ap-northeast"] {
        for i in 0..2 {
            v.push(Backend::new(format!("{r}-{i}"), r));
        }
    }
    v.push(Backend::new("mars-0", "mars"));
    v
}

fn at(lat: f64, lon: f64) -> Location {
    Location {
        lat,
        lon,
        country: None,
        precision: Precision::Coordinates,
    }
}

fn build(policy: &str, config: &SelectConfig) -> Selector {
    let policy: LbPolicy = policy.parse().expect("valid policy");
    Selector::build(&policy, fleet(), &regions(), config).expect("valid selector")
}

fn regions_in_order(sel: &Selector, input: &SelectInput<'_>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for b in sel.iter(input) {
        if out.last() != Some(&b.region) {
            out.push(b.region.clone());
        }
    }
    out
}

#[test]
fn geo_prefers_the_nearest_region_and_fails_over_in_distance_order() {
    let sel = build("geo", &SelectConfig::default());
    let berlin = at(52.52, 13.405);
    let input = SelectInput::new(ip("193.99.144.80")).with_location(Some(&berlin));
    assert_eq!(
        regions_in_order(&sel, &input),
        ["eu-west", "us-east", "ap-northeast", "mars"]
    );
    let all: BTreeSet<String> = sel.iter(&input).map(|b| b.id.clone()).collect();
    assert_eq!(all.len(), 7, "every backend exactly once");

    // eu-west down: the caller rejects its backends and lands in us-east.
    let chosen = sel
        .select(&input, |b| b.region != "eu-west")
        .expect("a backend");
    assert_eq!(chosen.region, "us-east");

    let tokyo = at(35.0, 135.0);
    let input = SelectInput::new(ip("203.178.141.194")).with_location(Some(&tokyo));
    assert_eq!(regions_in_order(&sel, &input)[0], "ap-northeast");
}

#[test]
fn geo_without_a_location_uses_the_home_region_or_config_order() {
    let input = SelectInput::new(ip("10.0.0.1"));
    let plain = build("geo", &SelectConfig::default());
    assert_eq!(
        regions_in_order(&plain, &input),
        ["us-east", "eu-west", "ap-northeast", "mars"]
    );
    let home = SelectConfig {
        home_region: Some("ap-northeast".into()),
        ..SelectConfig::default()
    };
    let homed = build("geo", &home);
    assert_eq!(regions_in_order(&homed, &input)[0], "ap-northeast");
}

#[test]
fn geo_round_robin_alternates_inside_the_region() {
    let sel = build("geo", &SelectConfig::default());
    let paris = at(48.86, 2.35);
    let input = SelectInput::new(ip("192.0.2.1")).with_location(Some(&paris));
    let firsts: BTreeSet<String> = (0..4)
        .map(|_| sel.iter(&input).next().expect("a backend").id.clone())
        .collect();
    assert_eq!(
        firsts,
        BTreeSet::from(["eu-west-0".to_owned(), "eu-west-1".to_owned()])
    );
}

#[test]
fn geo_hash_is_sticky_inside_the_region() {
    let sel = build("geo+hash:ip", &SelectConfig::default());
    let paris = at(48.86, 2.35);
    for client in ["192.0.2.1", "198.51.100.7", "2001:db8::42"] {
        let input = SelectInput::new(ip(client)).with_location(Some(&paris));
        let first = sel.iter(&input).next().expect("a backend").id.clone();
        assert!(first.starts_with("eu-west"));
        for _ in 0..5 {
            assert_eq!(
                sel.iter(&input).next().map(|b| b.id.clone()),
                Some(first.clone())
            );
        }
    }
}

#[test]
fn hash_header_uses_the_key_and_falls_back_to_the_ip() {
    let sel = build("hash:header=x-user", &SelectConfig::default());
    assert_eq!(
        sel.policy().hash_key(),
        Some(&HashKey::Header("x-user".into()))
    );
    // The same user from many addresses lands on one backend.
    let mut seen = BTreeSet::new();
    for i in 0..50u8 {
        let client = IpAddr::from([198, 51, 100, i]);
        let input = SelectInput::new(client).with_hash_key(Some(b"user-17"));
        seen.insert(sel.iter(&input).next().expect("a backend").id.clone());
    }
    assert_eq!(seen.len(), 1);
    // Without the header, different addresses spread out.
    let mut spread = BTreeSet::new();
    for i in 0..50u8 {
        let input = SelectInput::new(IpAddr::from([198, 51, 100, i]));
        spread.insert(sel.iter(&input).next().expect("a backend").id.clone());
    }
    assert!(spread.len() > 3, "{spread:?}");
}

#[test]
fn mapped_ipv4_hashes_like_ipv4() {
    let a = SelectInput::new(ip("192.0.2.1")).key_hash();
    let b = SelectInput::new(ip("::ffff:192.0.2.1")).key_hash();
    assert_eq!(a, b);
    assert_ne!(a, SelectInput::new(ip("192.0.2.2")).key_hash());
}

#[test]
fn least_conn_policy_follows_load() {
    let sel = build("least-conn", &SelectConfig::default());
    let input = SelectInput::new(ip("192.0.2.1"));
    let mut guards = Vec::new();
    for b in sel.backends() {
        if b.id != "eu-west-1" {
            guards.push(b.load.acquire());
        }
    }
    assert_eq!(
        sel.iter(&input).next().map(|b| b.id.as_str()),
        Some("eu-west-1")
    );
}

#[test]
fn every_policy_yields_every_backend_exactly_once() {
    for policy in [
        "round-robin",
        "least-conn",
        "hash:ip",
        "hash:cookie=sid",
        "geo",
        "geo+least-conn",
        "geo+hash:ip",
    ] {
        let sel = build(policy, &SelectConfig::default());
        let berlin = at(52.52, 13.405);
        for loc in [None, Some(&berlin)] {
            let input = SelectInput::new(ip("192.0.2.77")).with_location(loc);
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for b in sel.iter(&input) {
                *counts.entry(b.id.clone()).or_insert(0) += 1;
            }
            assert_eq!(counts.len(), 7, "{policy}");
            assert!(counts.values().all(|&c| c == 1), "{policy}: {counts:?}");
        }
    }
}

#[test]
fn build_errors_name_the_culprit() {
    let p = LbPolicy::RoundRobin;
    let dup = vec![Backend::new("x", "r"), Backend::new("x", "r")];
    let e = Selector::build(&p, dup, &[], &SelectConfig::default()).expect_err("dup");
    assert!(e.to_string().contains("\"x\""), "{e}");
    let heavy = vec![Backend::new("h", "r").with_weight(MAX_WEIGHT + 1)];
    let e = Selector::build(&p, heavy, &[], &SelectConfig::default()).expect_err("weight");
    assert!(e.to_string().contains("10001"), "{e}");
    let bad_home = SelectConfig {
        home_region: Some("nowhere".into()),
        ..SelectConfig::default()
    };
    let geo = LbPolicy::Geo(RegionMethod::RoundRobin);
    let e = Selector::build(&geo, fleet(), &regions(), &bad_home).expect_err("home");
    assert!(e.to_string().contains("nowhere"), "{e}");
    let drained = vec![Backend::new("d", "r").with_weight(0)];
    let sel = Selector::build(&p, drained, &[], &SelectConfig::default()).expect("ok");
    assert!(sel
        .iter(&SelectInput::new(ip("192.0.2.1")))
        .next()
        .is_none());
}

#[test]
fn select_config_parses_with_defaults_and_rejects_unknown_fields() {
    let c: SelectConfig = serde_json::from_str("{}").expect("defaults");
    assert_eq!(c, SelectConfig::default());
    assert_eq!(c.hash.table_size, 65_537);
    assert_eq!(c.hash.load_factor, 1.25);
    let c: SelectConfig =
        serde_json::from_str(r#"{"hash": {"table_size": 5003}, "home_region": "eu-west"}"#)
            .expect("partial");
    assert_eq!(c.hash.table_size, 5003);
    assert!(c.hash.bounded_load);
    assert!(c.validate(&regions()).is_ok());
    assert!(serde_json::from_str::<SelectConfig>(r#"{"hash": {"size": 5}}"#).is_err());
}

#[test]
fn load_guards_count_and_release() {
    let counter = LoadCounter::default();
    let a = counter.acquire();
    let b = counter.acquire();
    assert_eq!(counter.get(), 2);
    drop(a);
    assert_eq!(counter.get(), 1);
    drop(b);
    assert_eq!(counter.get(), 0);
}

#[test]
fn cookie_values_are_found() {
    let h = b"a=1; sid=\"abc\"; theme=dark;empty=;  sp = x ";
    assert_eq!(cookie_value(h, "a"), Some(&b"1"[..]));
    assert_eq!(cookie_value(h, "sid"), Some(&b"abc"[..]));
    assert_eq!(cookie_value(h, "theme"), Some(&b"dark"[..]));
    assert_eq!(cookie_value(h, "empty"), Some(&b""[..]));
    assert_eq!(cookie_value(h, "sp"), Some(&b"x"[..]));
    assert_eq!(cookie_value(h, "SID"), None);
    assert_eq!(cookie_value(h, "missing"), None);
    assert_eq!(cookie_value(b"noequals; x=1", "noequals"), None);
    assert_eq!(cookie_value(b"", "a"), None);
    assert_eq!(cookie_value(b"x=\"", "x"), Some(&b"\""[..]));
}

proptest! {
    #[test]
    fn cookie_parsing_never_panics_and_finds_what_was_set(
        header in prop::collection::vec(any::<u8>(), 0..200),
        name in "c[A-Za-z0-9_]{0,12}",
        value in "[A-Za-z0-9_/+=-]{0,20}",
    ) {
        let _ = cookie_value(&header, &name);
        let built = format!("pre=1; {name}={value}; post=2");
        prop_assert_eq!(cookie_value(built.as_bytes(), &name), Some(value.as_bytes()));
    }
}
