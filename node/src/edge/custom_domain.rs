//! Custom domains proven by DNS TXT records (docs/custom-domains.md).
//!
//! A custom domain routes when two things agree:
//! - the replicated state holds a *verified* claim `domain → (app, port)`: only an operator can
//!   add one, and `domain verify` sets it after finding the claim's random token in
//!   `_portcullis-challenge.<domain>`;
//! - the dstack-compatible record `_dstack-app-address.<domain>` = `<app>:<port>` names the
//!   same app. The port comes from this record (so the domain owner can move traffic between the
//!   app's ports without an admin call); a record without `:<port>` uses the claimed port.
//!
//! The state is checked first and DNS second, so a name nobody claimed never causes a lookup:
//! a flood of random SNI names costs a hash lookup, not a DNS query.

use rand::RngCore;

use super::dns::{DnsError, TxtAnswer, TxtResolver};
use super::grammar::{self, ParsedHost};
use super::route::{Route, RouteError, RouteTable};

/// Ownership proof: a TXT record here must contain the claim's token.
pub const CHALLENGE_LABEL: &str = "_portcullis-challenge";
/// dstack's routing record: `<app>:<port>`.
pub const APP_ADDRESS_LABEL: &str = "_dstack-app-address";

pub fn challenge_name(domain: &str) -> String {
    format!("{CHALLENGE_LABEL}.{domain}")
}

pub fn app_address_name(domain: &str) -> String {
    format!("{APP_ADDRESS_LABEL}.{domain}")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainNameError {
    #[error("{0:?} is not a DNS name: {1}")]
    NotDnsName(String, &'static str),
    #[error("{name:?} is inside the base domain {base:?}; names there are routed as apps already")]
    InsideBase { name: String, base: String },
    #[error("{0:?} is under .internal, which is reserved for operators' debugging")]
    Internal(String),
}

/// Lowercases, strips one trailing dot and checks that `input` is a host name this cluster
/// could be asked for and does not route already: at least two labels of letters, digits and
/// inner hyphens, not an IP address, not a wildcard, not under a base domain or `.internal`.
pub fn normalize_domain(input: &str, bases: &[String]) -> Result<String, DomainNameError> {
    let bad = |why| Err(DomainNameError::NotDnsName(input.to_string(), why));
    let name = input.trim();
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return bad("needs at least two labels, e.g. api.example.com");
    }
    for l in &labels {
        if l.is_empty() {
            return bad("has an empty label");
        }
        if l.len() > 63 {
            return bad("has a label longer than 63 characters");
        }
        if *l == "*" {
            return bad("wildcards cannot be claimed; claim each name");
        }
        if !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return bad("only letters, digits, '-' and '.' are allowed (international names in punycode, xn--...)");
        }
        if l.starts_with('-') || l.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad("looks like an IP address");
    }
    if name == "internal" || name.ends_with(".internal") {
        return Err(DomainNameError::Internal(name));
    }
    for base in bases {
        let base = base.trim_end_matches('.').to_ascii_lowercase();
        if name == base || name.ends_with(&format!(".{base}")) {
            return Err(DomainNameError::InsideBase { name, base });
        }
    }
    Ok(name)
}

/// A fresh claim token: 128 random bits, hex. Long enough that it cannot be guessed, short
/// enough to paste into a DNS console.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("portcullis-{hex}")
}

/// One `_dstack-app-address` value: `<app>:<port>` or `<app>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppAddress {
    pub app: String,
    pub port: Option<u16>,
}

/// Parses `<app>[:<port>]`; `None` for anything else (the record may hold unrelated text).
pub fn parse_app_address(s: &str) -> Option<AppAddress> {
    let s = s.trim();
    let (app, port) = match s.rsplit_once(':') {
        Some((a, p)) => (a, Some(p.parse::<u16>().ok().filter(|p| *p != 0)?)),
        None => (s, None),
    };
    let ok = !app.is_empty()
        && app.len() <= 63
        && app
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    ok.then(|| AppAddress {
        app: app.to_string(),
        port,
    })
}

/// Why the `_dstack-app-address` records do not route to the claimed app.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// `source` names the record already.
    #[error("{source}")]
    Lookup { record: String, source: DnsError },
    #[error("{record} names {found:?}, not app {app:?} (expected \"{app}:<port>\")")]
    OtherApp {
        record: String,
        app: String,
        found: Vec<String>,
    },
    #[error("{record} names app {app:?} with different ports {ports:?}; publish one")]
    Ambiguous {
        record: String,
        app: String,
        ports: Vec<u16>,
    },
}

/// The port the `_dstack-app-address` records give for `app`: the one port among the records
/// naming `app`, or `claimed_port` when they name it without a port.
pub fn address_port(
    domain: &str,
    answer: &TxtAnswer,
    app: &str,
    claimed_port: u16,
) -> Result<u16, AddressError> {
    let record = app_address_name(domain);
    let records = answer.as_ref().map_err(|e| AddressError::Lookup {
        record: record.clone(),
        source: e.clone(),
    })?;
    let mut ports: Vec<u16> = records
        .iter()
        .filter_map(|r| parse_app_address(r))
        .filter(|a| a.app == app)
        .map(|a| a.port.unwrap_or(claimed_port))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    match ports.as_slice() {
        [p] => Ok(*p),
        [] => Err(AddressError::OtherApp {
            record,
            app: app.to_string(),
            found: records.to_vec(),
        }),
        _ => Err(AddressError::Ambiguous {
            record,
            app: app.to_string(),
            ports,
        }),
    }
}

/// One failed check of `domain verify`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    #[error("ownership: {source}")]
    ChallengeLookup { record: String, source: DnsError },
    #[error("ownership: {record} does not contain the claim's token {token:?} (found {found:?})")]
    TokenMissing {
        record: String,
        token: String,
        found: Vec<String>,
    },
    #[error("routing: {0}")]
    Address(AddressError),
    #[error("routing: app {app:?} does not declare port {port} (its ports: {ports:?})")]
    PortNotDeclared {
        app: String,
        port: u16,
        ports: Vec<u16>,
    },
}

/// Every check `domain verify` found failing, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{domain} not verified: {}", .failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))]
pub struct VerifyError {
    pub domain: String,
    pub failures: Vec<CheckFailure>,
}

/// What `domain verify` needs to know about the claim.
pub struct Claim<'a> {
    pub domain: &'a str,
    pub app: &'a str,
    pub token: &'a str,
    pub port: u16,
    /// The app's declared ports (empty when unknown: not checked).
    pub app_ports: &'a [u16],
}

/// Looks both records up straight from the nameservers (not the cache) and checks them.
/// Returns the port the domain will route to.
pub async fn verify(resolver: &TxtResolver, claim: &Claim<'_>) -> Result<u16, VerifyError> {
    let challenge = challenge_name(claim.domain);
    let address = app_address_name(claim.domain);
    let (ch, addr) = tokio::join!(
        resolver.lookup_fresh(&challenge),
        resolver.lookup_fresh(&address),
    );
    let mut failures = Vec::new();
    match ch {
        Err(source) => failures.push(CheckFailure::ChallengeLookup {
            record: challenge,
            source,
        }),
        Ok(records) => {
            if !records.iter().any(|r| r.contains(claim.token)) {
                failures.push(CheckFailure::TokenMissing {
                    record: challenge,
                    token: claim.token.to_string(),
                    found: records.to_vec(),
                });
            }
        }
    }
    let port = match address_port(claim.domain, &addr, claim.app, claim.port) {
        Ok(p) => {
            if !claim.app_ports.is_empty() && !claim.app_ports.contains(&p) {
                failures.push(CheckFailure::PortNotDeclared {
                    app: claim.app.to_string(),
                    port: p,
                    ports: claim.app_ports.to_vec(),
                });
            }
            p
        }
        Err(e) => {
            failures.push(CheckFailure::Address(e));
            0
        }
    };
    if failures.is_empty() {
        Ok(port)
    } else {
        Err(VerifyError {
            domain: claim.domain.to_string(),
            failures,
        })
    }
}

/// The data plane's view of custom domains: the routing table's verified claims, confirmed
/// by the (cached) `_dstack-app-address` record at request time.
#[derive(Debug, Clone)]
pub struct CustomDomains {
    resolver: TxtResolver,
}

impl CustomDomains {
    pub fn new(resolver: TxtResolver) -> Self {
        CustomDomains { resolver }
    }

    /// Resolves a host like [`RouteTable::resolve`], with the DNS check for custom domains.
    /// Waits at most the resolver's deadline, and only on a cache miss for a claimed domain.
    pub async fn resolve(&self, routes: &RouteTable, host: &str) -> Result<Route, RouteError> {
        let domain = match grammar::parse_host(host, routes.bases()) {
            Ok(ParsedHost::Custom { host }) => host,
            _ => return routes.resolve(host),
        };
        let Some((app, claimed_port, passthrough)) = routes.custom_claim(&domain) else {
            return Err(RouteError::UnknownDomain(domain));
        };
        let answer = self.resolver.lookup(&app_address_name(&domain)).await;
        let port = address_port(&domain, &answer, app, claimed_port).map_err(|e| {
            let reason = match &e {
                AddressError::Lookup { .. } => "lookup",
                AddressError::OtherApp { .. } => "other_app",
                AddressError::Ambiguous { .. } => "ambiguous",
            };
            self.resolver
                .metrics()
                .unrouted
                .get_or_create(&super::dns::UnroutedLabels { reason })
                .inc();
            tracing::debug!(domain = %domain, error = %e, "custom domain not routed");
            RouteError::CustomDomainDns {
                domain: domain.clone(),
                reason: e.to_string(),
            }
        })?;
        routes.custom_route(app, port, passthrough)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn bases() -> Vec<String> {
        vec!["apps.example.com".into()]
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(
            normalize_domain(" API.MyCompany.com. ", &bases()).as_deref(),
            Ok("api.mycompany.com")
        );
        assert_eq!(
            normalize_domain("a-b.c0.io", &bases()).as_deref(),
            Ok("a-b.c0.io")
        );
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        for (input, why) in [
            ("", "empty"),
            ("localhost", "two labels"),
            ("a..b.com", "empty label"),
            ("-a.example.com", "starts or ends"),
            ("a_b.example.com", "only letters"),
            ("*.example.com", "wildcards"),
            ("10.0.0.1", "IP address"),
            ("api.example.com..", "empty label"),
        ] {
            let e = normalize_domain(input, &bases()).expect_err(input);
            assert!(e.to_string().contains(why), "{input:?}: {e}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(normalize_domain(&long, &bases()).is_err());
        assert!(matches!(
            normalize_domain("x.Apps.Example.com", &bases()),
            Err(DomainNameError::InsideBase { .. })
        ));
        assert!(matches!(
            normalize_domain("apps.example.com.", &bases()),
            Err(DomainNameError::InsideBase { .. })
        ));
        assert!(matches!(
            normalize_domain("cvm-1.internal", &bases()),
            Err(DomainNameError::Internal(_))
        ));
        // Only a real suffix: `myapps.example.com` is not inside `apps.example.com`.
        assert!(normalize_domain("myapps.example.com", &bases()).is_ok());
    }

    #[test]
    fn tokens_are_random() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), "portcullis-".len() + 32);
    }

    #[test]
    fn app_addresses() {
        assert_eq!(
            parse_app_address("web:8080"),
            Some(AppAddress {
                app: "web".into(),
                port: Some(8080)
            })
        );
        assert_eq!(
            parse_app_address(" web "),
            Some(AppAddress {
                app: "web".into(),
                port: None
            })
        );
        assert_eq!(parse_app_address("web:0"), None);
        assert_eq!(parse_app_address("web:99999"), None);
        assert_eq!(parse_app_address("v=spf1 -all"), None);
        assert_eq!(parse_app_address(":80"), None);
    }

    fn answer(records: &[&str]) -> TxtAnswer {
        Ok(Arc::from(
            records.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ))
    }

    proptest::proptest! {
        #[test]
        fn normalizing_never_panics_and_is_idempotent(input in ".{0,80}") {
            if let Ok(n) = normalize_domain(&input, &bases()) {
                proptest::prop_assert_eq!(normalize_domain(&n, &bases()), Ok(n.clone()));
                // Whatever is accepted is a name the routing grammar calls custom.
                let custom = matches!(
                    grammar::parse_host(&n, &bases()),
                    Ok(ParsedHost::Custom { .. })
                );
                proptest::prop_assert!(custom);
            }
        }

        #[test]
        fn dns_like_names_normalize_to_lowercase_without_the_dot(
            input in "[A-Za-z0-9-]{1,10}(\\.[A-Za-z0-9-]{1,10}){1,3}\\.?"
        ) {
            if let Ok(n) = normalize_domain(&input, &bases()) {
                proptest::prop_assert_eq!(&n, &input.trim_end_matches('.').to_ascii_lowercase());
                proptest::prop_assert_eq!(normalize_domain(&n, &bases()), Ok(n.clone()));
            }
        }

        #[test]
        fn dns_like_names_under_a_base_are_refused(label in "[a-z0-9]{1,20}") {
            let name = format!("{label}.apps.example.com");
            let inside = matches!(
                normalize_domain(&name, &bases()),
                Err(DomainNameError::InsideBase { .. })
            );
            proptest::prop_assert!(inside);
        }

        #[test]
        fn app_address_parsing_never_panics(s in ".{0,80}") {
            let _ = parse_app_address(&s);
        }
    }

    /// A nameserver that answers every name with fixed records.
    struct Fixed(Vec<String>);

    #[async_trait::async_trait]
    impl crate::edge::dns::TxtSource for Fixed {
        async fn txt(&self, name: &str) -> Result<(Vec<String>, std::time::Duration), DnsError> {
            if self.0.is_empty() {
                return Err(DnsError::NotFound(name.to_string()));
            }
            Ok((self.0.clone(), std::time::Duration::from_secs(60)))
        }
    }

    fn edge_with(records: &[&str]) -> CustomDomains {
        let src = Fixed(records.iter().map(|s| s.to_string()).collect());
        CustomDomains::new(TxtResolver::with_source(
            &crate::edge::dns::DnsConfig::default(),
            Arc::new(src),
        ))
    }

    fn table() -> RouteTable {
        use portcullis_raft::state::{App, Domain};
        let mut s = portcullis_raft::ClusterState::default();
        for (name, ports) in [("web", vec![8080, 9000]), ("other", vec![80])] {
            s.apps.insert(
                name.into(),
                App {
                    name: name.into(),
                    ports,
                    lb: "round-robin".into(),
                    revision: 1,
                },
            );
        }
        for (name, verified, passthrough) in [
            ("api.example.org", true, false),
            ("tls.example.org", true, true),
            ("pending.example.org", false, false),
        ] {
            s.domains.insert(
                name.into(),
                Domain {
                    name: name.into(),
                    app: "web".into(),
                    port: 8080,
                    verified,
                    passthrough,
                    ..Default::default()
                },
            );
        }
        RouteTable::build(&s, &bases(), 1)
    }

    #[tokio::test]
    async fn request_time_routing_needs_claim_and_record_to_agree() {
        use crate::edge::grammar::Mode;
        let t = table();
        // The port comes from the record.
        let r = edge_with(&["web:9000"])
            .resolve(&t, "API.example.org.")
            .await
            .expect("route");
        assert_eq!((r.app.as_ref(), r.port, r.mode), ("web", 9000, Mode::Http));
        let r = edge_with(&["web"])
            .resolve(&t, "tls.example.org")
            .await
            .expect("route");
        assert_eq!((r.port, r.mode), (8080, Mode::Passthrough));
        // A record naming another app, a missing record, an undeclared port: no route.
        for records in [&["other:80"][..], &[], &["web:1234"]] {
            let e = edge_with(records).resolve(&t, "api.example.org").await;
            assert!(e.is_err(), "{records:?}: {e:?}");
        }
        // No verified claim: no route, whatever DNS says.
        assert_eq!(
            edge_with(&["web:8080"])
                .resolve(&t, "pending.example.org")
                .await,
            Err(RouteError::UnknownDomain("pending.example.org".into()))
        );
        // Names under the base domains are the routing table's business alone.
        assert!(matches!(
            edge_with(&["other:80"])
                .resolve(&t, "web.apps.example.com")
                .await,
            Ok(r) if r.app.as_ref() == "web"
        ));
    }

    #[test]
    fn the_record_must_name_the_claimed_app() {
        let d = "api.example.org";
        assert_eq!(
            address_port(d, &answer(&["web:9000"]), "web", 8080),
            Ok(9000)
        );
        assert_eq!(address_port(d, &answer(&["web"]), "web", 8080), Ok(8080));
        // Unrelated records beside ours are fine.
        assert_eq!(
            address_port(d, &answer(&["hello", "web:9000"]), "web", 8080),
            Ok(9000)
        );
        assert!(matches!(
            address_port(d, &answer(&["other:9000"]), "web", 8080),
            Err(AddressError::OtherApp { .. })
        ));
        assert!(matches!(
            address_port(d, &answer(&["web:1", "web:2"]), "web", 8080),
            Err(AddressError::Ambiguous { .. })
        ));
        let missing: TxtAnswer = Err(DnsError::NotFound(app_address_name(d)));
        let e = address_port(d, &missing, "web", 8080).expect_err("missing");
        assert!(e
            .to_string()
            .contains("_dstack-app-address.api.example.org"));
    }
}
