//! The compiled routing table: host name → route, from one applied `ClusterState`.
//!
//! A table is immutable once built; the edge rebuilds it on every state change and swaps it in
//! with `ArcSwap`, so the request path reads it without a lock. Lookup order for a name under a
//! base domain: instance ids first (the whole first label, then its name part with a port),
//! then app names. Names outside the base domains are looked up among verified custom domains.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use portcullis_raft::ClusterState;

use super::grammar::{self, GrammarError, Mode, ParsedHost};

/// One registered instance as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub instance_id: String,
    pub app: String,
    pub region: String,
    pub tunnel_ip: Option<IpAddr>,
    /// `host` or `host:port`; see [`Backend::address`].
    pub backend_addr: Option<String>,
}

impl Backend {
    /// The `host:port` to connect to for app port `port`.
    ///
    /// A `backend_addr` of `host:port` says where the app's *default* port is served (local
    /// processes rarely get the port the app declares); other ports go to the same host. A bare
    /// `host` serves every port as declared. Without a `backend_addr`, the instance is reached
    /// at its tunnel IP (the WireGuard upstream).
    pub fn address(&self, port: u16, default_port: u16) -> Option<String> {
        match &self.backend_addr {
            Some(addr) => {
                let (host, fixed) = split_host_port(addr);
                match fixed {
                    Some(p) if port == default_port => Some(join_host_port(host, p)),
                    _ => Some(join_host_port(host, port)),
                }
            }
            // SocketAddr brackets an IPv6 address (`[fd00::5]:8080`).
            None => self
                .tunnel_ip
                .map(|ip| SocketAddr::new(ip, port).to_string()),
        }
    }
}

/// Splits `host:port`, `[v6]:port`, `v6`, `[v6]` or `host`.
pub fn split_host_port(addr: &str) -> (&str, Option<u16>) {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    if addr.parse::<IpAddr>().is_ok() {
        return (addr, None);
    }
    match addr.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (addr, None),
        },
        None => (addr, None),
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

struct AppEntry {
    ports: Vec<u16>,
    instances: Vec<Arc<Backend>>,
    /// Round-robin position. Resets when the table is rebuilt, which is harmless.
    next: AtomicUsize,
}

/// Where a request or connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub app: Arc<str>,
    pub port: u16,
    pub default_port: u16,
    pub mode: Mode,
    /// Set for `<instance-id>.<base>` and `<cvm-id>.internal`: only this instance serves.
    pub pinned: Option<Arc<Backend>>,
    pub internal: bool,
}

impl Route {
    /// Two names belong to the same route when they reach the same backends the same way; the
    /// Host of a request must belong to the route its connection's SNI chose.
    pub fn same_target(&self, other: &Route) -> bool {
        self.app == other.app
            && self.port == other.port
            && self.mode == other.mode
            && self.pinned.as_ref().map(|b| &b.instance_id)
                == other.pinned.as_ref().map(|b| &b.instance_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Grammar(#[from] GrammarError),
    #[error("no app or instance named {0:?}")]
    UnknownName(String),
    #[error("app {app:?} does not declare port {port}")]
    UnknownPort { app: String, port: u16 },
    #[error("no custom domain {0:?}")]
    UnknownDomain(String),
    #[error("no instance {0:?} for an internal name")]
    UnknownCvm(String),
    /// A verified custom domain whose `_dstack-app-address` record does not agree with the claim.
    #[error("custom domain {domain:?}: {reason}")]
    CustomDomainDns { domain: String, reason: String },
}

/// The routing table built from one applied state.
pub struct RouteTable {
    bases: Vec<String>,
    apps: HashMap<String, AppEntry>,
    instances: HashMap<String, Arc<Backend>>,
    /// Verified custom domains: name → (app, port, passthrough).
    domains: HashMap<String, (String, u16, bool)>,
    /// The Raft log index this table reflects.
    pub applied_index: u64,
}

impl RouteTable {
    pub fn build(state: &ClusterState, bases: &[String], applied_index: u64) -> Self {
        let mut instances = HashMap::new();
        let mut apps: HashMap<String, AppEntry> = state
            .apps
            .values()
            .map(|a| {
                (
                    a.name.clone(),
                    AppEntry {
                        ports: a.ports.clone(),
                        instances: Vec::new(),
                        next: AtomicUsize::new(0),
                    },
                )
            })
            .collect();
        for i in state.instances.values() {
            let b = Arc::new(Backend {
                instance_id: i.instance_id.clone(),
                app: i.app.clone(),
                region: i.region.clone(),
                tunnel_ip: i.tunnel_ip,
                backend_addr: i.backend_addr.clone(),
            });
            // Host names are case-insensitive; instance ids are matched the same way.
            instances.insert(i.instance_id.to_ascii_lowercase(), b.clone());
            if let Some(app) = apps.get_mut(&i.app) {
                app.instances.push(b);
            }
        }
        let domains = state
            .domains
            .values()
            .filter(|d| d.verified)
            .map(|d| (d.name.clone(), (d.app.clone(), d.port, d.passthrough)))
            .collect();
        RouteTable {
            bases: bases.to_vec(),
            apps,
            instances,
            domains,
            applied_index,
        }
    }

    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// An instance by id (case-insensitive, like host names).
    pub fn instance(&self, id: &str) -> Option<&Arc<Backend>> {
        self.instances.get(&id.to_ascii_lowercase())
    }

    /// Every instance with the address its app's default port is served at: what health
    /// probes connect to.
    pub fn probe_targets(&self) -> Vec<(String, String)> {
        self.instances
            .values()
            .filter_map(|b| {
                let port = self
                    .apps
                    .get(&b.app)
                    .and_then(|a| a.ports.first().copied())?;
                Some((b.instance_id.clone(), b.address(port, port)?))
            })
            .collect()
    }

    /// Resolves a host name (SNI or Host, without port).
    pub fn resolve(&self, host: &str) -> Result<Route, RouteError> {
        match grammar::parse_host(host, &self.bases)? {
            ParsedHost::Base { label, .. } => {
                if let Some(b) = self.instances.get(&label.whole) {
                    return self.pinned(b, None, Mode::Http);
                }
                if label.port.is_some() {
                    if let Some(b) = self.instances.get(&label.name) {
                        return self.pinned(b, label.port, label.mode);
                    }
                }
                let app = self
                    .apps
                    .get(&label.name)
                    .ok_or_else(|| RouteError::UnknownName(label.whole.clone()))?;
                self.app_route(&label.name, app, label.port, label.mode)
            }
            ParsedHost::Internal { cvm_id } => {
                let b = self
                    .instances
                    .get(&cvm_id)
                    .ok_or(RouteError::UnknownCvm(cvm_id))?;
                let mut r = self.pinned(b, None, Mode::Http)?;
                r.internal = true;
                Ok(r)
            }
            ParsedHost::Custom { host } => {
                let (app_name, port, passthrough) = self
                    .domains
                    .get(&host)
                    .ok_or(RouteError::UnknownDomain(host))?;
                let app = self
                    .apps
                    .get(app_name)
                    .ok_or_else(|| RouteError::UnknownName(app_name.clone()))?;
                let mode = if *passthrough {
                    Mode::Passthrough
                } else {
                    Mode::Http
                };
                self.app_route(app_name, app, Some(*port), mode)
            }
        }
    }

    /// The verified claim on a custom domain (normalized name): (app, port, passthrough).
    pub fn custom_claim(&self, domain: &str) -> Option<(&str, u16, bool)> {
        self.domains
            .get(domain)
            .map(|(app, port, pt)| (app.as_str(), *port, *pt))
    }

    /// The route of a custom domain once DNS named `app` and `port` (`custom_domain.rs`).
    pub fn custom_route(
        &self,
        app: &str,
        port: u16,
        passthrough: bool,
    ) -> Result<Route, RouteError> {
        let entry = self
            .apps
            .get(app)
            .ok_or_else(|| RouteError::UnknownName(app.to_string()))?;
        let mode = if passthrough {
            Mode::Passthrough
        } else {
            Mode::Http
        };
        self.app_route(app, entry, Some(port), mode)
    }

    fn app_route(
        &self,
        name: &str,
        app: &AppEntry,
        port: Option<u16>,
        mode: Mode,
    ) -> Result<Route, RouteError> {
        let default_port = app.ports.first().copied().unwrap_or(80);
        let port = port.unwrap_or(default_port);
        if !app.ports.contains(&port) {
            return Err(RouteError::UnknownPort {
                app: name.to_string(),
                port,
            });
        }
        Ok(Route {
            app: Arc::from(name),
            port,
            default_port,
            mode,
            pinned: None,
            internal: false,
        })
    }

    fn pinned(&self, b: &Arc<Backend>, port: Option<u16>, mode: Mode) -> Result<Route, RouteError> {
        let default_port = self
            .apps
            .get(&b.app)
            .and_then(|a| a.ports.first().copied())
            .unwrap_or(80);
        Ok(Route {
            app: Arc::from(b.app.as_str()),
            port: port.unwrap_or(default_port),
            default_port,
            mode,
            pinned: Some(b.clone()),
            internal: false,
        })
    }

    /// Picks the backend for one request or connection: the pinned instance, or the app's
    /// instances in round robin. A small function on purpose: the geo crate's selectors
    /// (least connections, Maglev, nearest region) replace it.
    pub fn pick(&self, route: &Route) -> Option<Arc<Backend>> {
        if let Some(b) = &route.pinned {
            return Some(b.clone());
        }
        let app = self.apps.get(route.app.as_ref())?;
        if app.instances.is_empty() {
            return None;
        }
        let n = app.next.fetch_add(1, Ordering::Relaxed);
        app.instances.get(n % app.instances.len()).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_raft::state::{App, Domain, Instance};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (name, ports) in [("web", vec![8080, 9000]), ("api", vec![443])] {
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
        for (id, app, addr) in [
            ("w1", "web", "127.0.0.1:18080"),
            ("w2", "web", "127.0.0.2"),
            ("web-9000", "api", "10.0.0.9"),
        ] {
            s.instances.insert(
                id.into(),
                Instance {
                    instance_id: id.into(),
                    app: app.into(),
                    region: "r".into(),
                    backend_addr: Some(addr.into()),
                    ..Default::default()
                },
            );
        }
        s.domains.insert(
            "api.example.org".into(),
            Domain {
                name: "api.example.org".into(),
                app: "web".into(),
                port: 9000,
                verified: true,
                ..Default::default()
            },
        );
        s.domains.insert(
            "pending.example.org".into(),
            Domain {
                name: "pending.example.org".into(),
                app: "web".into(),
                port: 9000,
                verified: false,
                ..Default::default()
            },
        );
        s
    }

    fn table() -> RouteTable {
        RouteTable::build(&state(), &["apps.test".to_string()], 7)
    }

    #[test]
    fn app_routes_and_round_robin() {
        let t = table();
        let r = t.resolve("web.apps.test").expect("route");
        assert_eq!((r.app.as_ref(), r.port, r.mode), ("web", 8080, Mode::Http));
        let picks: Vec<String> = (0..4)
            .map(|_| t.pick(&r).expect("backend").instance_id.clone())
            .collect();
        assert_eq!(picks, ["w1", "w2", "w1", "w2"]);
        let r = t.resolve("web-9000s.apps.test").expect("route");
        assert_eq!((r.port, r.mode), (9000, Mode::Passthrough));
        assert_eq!(
            t.resolve("web-9999.apps.test"),
            Err(RouteError::UnknownPort {
                app: "web".into(),
                port: 9999
            })
        );
        assert_eq!(
            t.resolve("nope.apps.test"),
            Err(RouteError::UnknownName("nope".into()))
        );
    }

    #[test]
    fn instance_ids_are_checked_first() {
        let t = table();
        // `web-9000` is an instance of `api`, and wins over app `web` port 9000.
        let r = t.resolve("web-9000.apps.test").expect("route");
        assert_eq!(r.app.as_ref(), "api");
        assert_eq!(
            r.pinned.as_ref().map(|b| b.instance_id.as_str()),
            Some("web-9000")
        );
        let r = t.resolve("W1.apps.test").expect("route");
        assert_eq!(
            r.pinned.as_ref().map(|b| b.instance_id.as_str()),
            Some("w1")
        );
        let r = t.resolve("w1-9000g.apps.test").expect("route");
        assert_eq!((r.port, r.mode), (9000, Mode::H2c));
    }

    #[test]
    fn internal_and_custom_domains() {
        let t = table();
        let r = t.resolve("w2.internal").expect("internal");
        assert!(r.internal);
        assert_eq!(
            t.resolve("nope.internal"),
            Err(RouteError::UnknownCvm("nope".into()))
        );
        let r = t.resolve("api.example.org").expect("custom");
        assert_eq!((r.app.as_ref(), r.port), ("web", 9000));
        assert!(matches!(
            t.resolve("pending.example.org"),
            Err(RouteError::UnknownDomain(_))
        ));
    }

    #[test]
    fn same_target_compares_routes_not_names() {
        let t = table();
        let a = t.resolve("web.apps.test").expect("a");
        let b = t.resolve("web-8080.apps.test").expect("b");
        let c = t.resolve("web-9000.apps.test").expect("c");
        assert!(a.same_target(&b));
        assert!(!a.same_target(&c));
    }

    #[test]
    fn backend_addresses() {
        let b = |addr: Option<&str>| Backend {
            instance_id: "i".into(),
            app: "a".into(),
            region: "r".into(),
            tunnel_ip: Some(IpAddr::from([100, 64, 0, 5])),
            backend_addr: addr.map(String::from),
        };
        assert_eq!(
            b(Some("127.0.0.1:18080")).address(8080, 8080).as_deref(),
            Some("127.0.0.1:18080")
        );
        assert_eq!(
            b(Some("127.0.0.1:18080")).address(9000, 8080).as_deref(),
            Some("127.0.0.1:9000")
        );
        assert_eq!(
            b(Some("10.0.0.1")).address(9000, 8080).as_deref(),
            Some("10.0.0.1:9000")
        );
        assert_eq!(
            b(Some("[::1]:5")).address(8080, 8080).as_deref(),
            Some("[::1]:5")
        );
        assert_eq!(
            b(Some("::1")).address(8080, 8080).as_deref(),
            Some("[::1]:8080")
        );
        assert_eq!(
            b(None).address(8080, 8080).as_deref(),
            Some("100.64.0.5:8080")
        );
        let v6 = Backend {
            tunnel_ip: Some("fd00:1::5".parse().expect("ip")),
            ..b(None)
        };
        assert_eq!(v6.address(8080, 8080).as_deref(), Some("[fd00:1::5]:8080"));
    }
}
