use super::*;
use proptest::prelude::*;

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,40}"
}

fn hash_key() -> impl Strategy<Value = HashKey> {
    prop_oneof![
        Just(HashKey::ClientIp),
        token().prop_map(|n| HashKey::Header(n.to_ascii_lowercase())),
        token().prop_map(HashKey::Cookie),
    ]
}

fn method() -> impl Strategy<Value = RegionMethod> {
    prop_oneof![
        Just(RegionMethod::RoundRobin),
        Just(RegionMethod::LeastConn),
        hash_key().prop_map(RegionMethod::Hash),
    ]
}

fn policy() -> impl Strategy<Value = LbPolicy> {
    prop_oneof![
        method().prop_map(LbPolicy::from),
        method().prop_map(LbPolicy::Geo),
    ]
}

proptest! {
    #[test]
    fn display_then_parse_round_trips(p in policy()) {
        let s = p.to_string();
        prop_assert_eq!(s.parse::<LbPolicy>(), Ok(p));
    }

    /// Whatever parses has a canonical form that parses to the same policy.
    #[test]
    fn parse_is_total_and_canonical(s in "\\PC{0,60}|(geo\\+)?(hash:(header|cookie)=)?[ -~]{0,20}") {
        if let Ok(p) = s.parse::<LbPolicy>() {
            let canonical = p.to_string();
            prop_assert_eq!(canonical.parse::<LbPolicy>(), Ok(p));
        }
    }

    #[test]
    fn serde_round_trips(p in policy()) {
        let json = serde_json::to_string(&p).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&json, &format!("{:?}", p.to_string()));
        let back: LbPolicy = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, p);
    }
}

#[test]
fn serde_rejects_bad_policy_with_the_value() {
    let err = match serde_json::from_str::<LbPolicy>("\"hash:body\"") {
        Ok(p) => panic!("parsed {p:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("hash:body"), "{err}");
}

#[test]
fn parses_every_documented_form() {
    let cases = [
        ("round-robin", LbPolicy::RoundRobin),
        ("least-conn", LbPolicy::LeastConn),
        ("hash", LbPolicy::Hash(HashKey::ClientIp)),
        ("hash:ip", LbPolicy::Hash(HashKey::ClientIp)),
        (
            "hash:header=X-User-Id",
            LbPolicy::Hash(HashKey::Header("x-user-id".into())),
        ),
        (
            "hash:cookie=SESSION",
            LbPolicy::Hash(HashKey::Cookie("SESSION".into())),
        ),
        ("geo", LbPolicy::Geo(RegionMethod::RoundRobin)),
        ("geo+round-robin", LbPolicy::Geo(RegionMethod::RoundRobin)),
        ("geo+least-conn", LbPolicy::Geo(RegionMethod::LeastConn)),
        (
            "geo+hash:ip",
            LbPolicy::Geo(RegionMethod::Hash(HashKey::ClientIp)),
        ),
        (
            "geo+hash:cookie=sid",
            LbPolicy::Geo(RegionMethod::Hash(HashKey::Cookie("sid".into()))),
        ),
    ];
    for (s, want) in cases {
        assert_eq!(s.parse::<LbPolicy>(), Ok(want), "{s}");
    }
    assert_eq!(LbPolicy::default().to_string(), "round-robin");
    assert_eq!(
        "geo+round-robin".parse::<LbPolicy>().map(|p| p.to_string()),
        Ok("geo".to_owned())
    );
    assert_eq!(
        "hash".parse::<LbPolicy>().map(|p| p.to_string()),
        Ok("hash:ip".to_owned())
    );
}

#[test]
fn rejects_bad_input_with_the_value_in_the_message() {
    for bad in [
        "",
        "roundrobin",
        "Round-Robin",
        "least_conn",
        "hash:",
        "hash:port",
        "hash:header=",
        "hash:header=x y",
        "hash:header=a:b",
        "hash:cookie=",
        "hash:cookie=a;b",
        "geo+",
        "geo+geo",
        "geo+geo+least-conn",
        "geo+nearest",
        " round-robin",
        "round-robin ",
    ] {
        let err = match bad.parse::<LbPolicy>() {
            Ok(p) => panic!("{bad:?} parsed as {p:?}"),
            Err(e) => e,
        };
        assert_eq!(err.input, bad);
        assert!(
            err.to_string().contains(&format!("{bad:?}")),
            "message {err} does not quote {bad:?}"
        );
    }
    let long = format!("hash:header={}", "a".repeat(MAX_NAME_LEN + 1));
    assert!(long.parse::<LbPolicy>().is_err());
}

#[test]
fn hash_key_is_found_inside_geo() {
    let p: LbPolicy = "geo+hash:header=x-tenant".parse().expect("valid policy");
    assert_eq!(p.hash_key(), Some(&HashKey::Header("x-tenant".into())));
    assert_eq!(LbPolicy::LeastConn.hash_key(), None);
}
