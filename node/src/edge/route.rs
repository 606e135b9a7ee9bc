//! The compiled routing table: host name → route, from one applied `ClusterState`.
//!
//! A table is immutable once built; the edge compiles a new one on every state change and
//! swaps it in with `ArcSwap`, so the request path reads it without a lock. Lookup order for a
//! name under a base domain: an app's own routes first (`<app>` and `<app>-<port>` for a port
//! it declares), then instance ids (the whole first label, then its name part with a port).
//! The replicated state refuses new names that collide (`raft/src/state/names.rs`); putting
//! apps first means that a collision an older state still holds can never hand an app's
//! hostname to somebody's instance. Names outside the base domains are looked up among
//! verified custom domains.
//!
//! A pinned route (`<instance>-<port>`) reaches only ports the instance's app declares, and an
//! instance whose `backend_addr` is `host:port` only that one port: the same rules as the
//! app's own routes, so naming an instance never opens a port the app did not.
//!
//! Compiling: [`RouteTable::build`] reads a whole state; [`RouteTable::update`] derives the next
//! table from the previous one and the few keys that changed ([`RouteUpdate`]), sharing every
//! untouched per-app entry and map shard with it, so one CVM registering in a cluster of 65,536
//! costs microseconds instead of a full rebuild.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use portcullis_raft::state::{App, Domain, Instance};
use portcullis_raft::ClusterState;

use super::grammar::{self, GrammarError, Mode, ParsedHost};
use super::hostport::join_host_port;
pub use super::hostport::split_host_port;
use super::sharded::ShardedMap;

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
    /// processes rarely get the port the app declares), and serves nothing else: the operator
    /// named one port of that host, and any other port of it (an admin listener, say) was not
    /// named. A bare `host` serves every port as declared. Without a `backend_addr`, the
    /// instance is reached at its tunnel IP (the WireGuard upstream).
    ///
    /// The common case, a request to the default port of a `host:port` backend, borrows the
    /// stored address: this runs once per proxied request.
    pub fn address(&self, port: u16, default_port: u16) -> Option<Cow<'_, str>> {
        match &self.backend_addr {
            Some(addr) => {
                let (host, fixed) = split_host_port(addr);
                match fixed {
                    Some(_) if port == default_port => Some(Cow::Borrowed(addr)),
                    Some(_) => None,
                    None => Some(Cow::Owned(join_host_port(host, port))),
                }
            }
            // SocketAddr brackets an IPv6 address (`[fd00::5]:8080`).
            None => self
                .tunnel_ip
                .map(|ip| Cow::Owned(SocketAddr::new(ip, port).to_string())),
        }
    }
}

impl Backend {
    fn from_instance(i: &Instance) -> Backend {
        Backend {
            instance_id: i.instance_id.clone(),
            app: i.app.clone(),
            region: i.region.clone(),
            tunnel_ip: i.tunnel_ip,
            backend_addr: i.backend_addr.clone(),
        }
    }
}

/// What the table keeps of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppInfo {
    pub ports: Vec<u16>,
    /// The load-balancing policy as stored (the balancer parses it).
    pub lb: String,
    pub revision: u64,
}

impl AppInfo {
    fn from_app(a: &App) -> AppInfo {
        AppInfo {
            ports: a.ports.clone(),
            lb: a.lb.clone(),
            revision: a.revision,
        }
    }
}

/// One app name: the app, if it exists, and the instances registered under the name.
///
/// Instances can outlive their app only in states written by older builds; such a group
/// routes nothing, but keeps the instances so that an app created later under that name
/// picks them up, as a full build would.
pub(crate) struct AppEntry {
    pub app: Option<AppInfo>,
    /// Sorted by instance id (the state's order), which selectors and hashing depend on.
    pub instances: Vec<Arc<Backend>>,
    /// Round-robin position. Kept across rebuilds while the app's entry is unchanged.
    next: AtomicUsize,
}

impl AppEntry {
    fn ports(&self) -> Option<&[u16]> {
        self.app.as_ref().map(|a| a.ports.as_slice())
    }
}

/// Where a verified custom domain routes: (app, port, passthrough).
type DomainRoute = (String, u16, bool);

/// The routable form of a custom domain claim, verified ones only.
fn domain_route(d: &Domain) -> Option<DomainRoute> {
    d.verified.then(|| (d.app.clone(), d.port, d.passthrough))
}

/// The keys that changed since the previous table, with their new values (`None`: gone),
/// copied out of the state under its read lock so compiling can happen outside it.
#[derive(Debug, Default)]
pub(crate) struct RouteUpdate {
    /// By exact instance id.
    pub instances: Vec<(String, Option<Backend>)>,
    pub apps: Vec<(String, Option<AppInfo>)>,
    pub domains: Vec<(String, Option<DomainRoute>)>,
}

impl RouteUpdate {
    /// Copies the touched keys' current values out of `state`. O(touched keys).
    pub fn collect(
        state: &ClusterState,
        instances: impl IntoIterator<Item = String>,
        apps: impl IntoIterator<Item = String>,
        domains: impl IntoIterator<Item = String>,
    ) -> RouteUpdate {
        RouteUpdate {
            instances: instances
                .into_iter()
                .map(|id| {
                    let b = state.instances.get(&id).map(Backend::from_instance);
                    (id, b)
                })
                .collect(),
            apps: apps
                .into_iter()
                .map(|n| {
                    let a = state.apps.get(&n).map(AppInfo::from_app);
                    (n, a)
                })
                .collect(),
            domains: domains
                .into_iter()
                .map(|n| {
                    let d = state.domains.get(&n).and_then(domain_route);
                    (n, d)
                })
                .collect(),
        }
    }
}

/// An app entry being edited by [`RouteTable::update`].
struct EntryEdit {
    app: Option<AppInfo>,
    instances: Vec<Arc<Backend>>,
    next: usize,
}

impl EntryEdit {
    fn freeze(self) -> AppEntry {
        AppEntry {
            app: self.app,
            instances: self.instances,
            next: AtomicUsize::new(self.next),
        }
    }

    /// The edit of app `name`, started from its entry in `apps` on first use.
    fn of<'a>(
        edits: &'a mut HashMap<String, EntryEdit>,
        apps: &ShardedMap<Arc<AppEntry>>,
        name: &str,
    ) -> &'a mut EntryEdit {
        edits
            .entry(name.to_string())
            .or_insert_with(|| match apps.get(name) {
                Some(e) => EntryEdit {
                    app: e.app.clone(),
                    instances: e.instances.clone(),
                    next: e.next.load(Ordering::Relaxed),
                },
                None => EntryEdit {
                    app: None,
                    instances: Vec::new(),
                    next: 0,
                },
            })
    }
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
///
/// Cloning is cheap (shard pointers and `Arc`s): [`RouteTable::update`] clones the previous
/// table and replaces only what changed.
#[derive(Clone)]
pub struct RouteTable {
    bases: Vec<String>,
    /// By app name; see [`AppEntry`].
    apps: ShardedMap<Arc<AppEntry>>,
    /// By lowercased instance id (host names are case-insensitive). Ids that differ only in
    /// case share a key: the greatest id wins, as iterating the state in order and inserting
    /// each would leave it.
    instances: ShardedMap<Arc<Backend>>,
    /// The losers of such case collisions, by lowercased id, so that the next one up can take
    /// over when the winner goes. Empty in practice.
    shadowed: ShardedMap<Vec<Arc<Backend>>>,
    /// Verified custom domains: name → (app, port, passthrough).
    domains: Arc<HashMap<String, DomainRoute>>,
    /// The Raft log index this table reflects.
    pub applied_index: u64,
    /// The state-change journal position this table (and its snapshot) reflects; `None` for
    /// a table not compiled by `Edge::rebuild`, which the next rebuild replaces in full.
    pub(crate) changes: Option<portcullis_raft::changes::ChangeCursor>,
}

impl RouteTable {
    pub fn build(state: &ClusterState, bases: &[String], applied_index: u64) -> Self {
        let mut edits: HashMap<&str, EntryEdit> = state
            .apps
            .values()
            .map(|a| {
                let e = EntryEdit {
                    app: Some(AppInfo::from_app(a)),
                    instances: Vec::new(),
                    next: 0,
                };
                (a.name.as_str(), e)
            })
            .collect();
        let mut t = RouteTable {
            bases: bases.to_vec(),
            apps: ShardedMap::default(),
            instances: ShardedMap::default(),
            shadowed: ShardedMap::default(),
            domains: Arc::new(
                state
                    .domains
                    .values()
                    .filter_map(|d| Some((d.name.clone(), domain_route(d)?)))
                    .collect(),
            ),
            applied_index,
            changes: None,
        };
        // In id order, so every app's list comes out sorted.
        for i in state.instances.values() {
            let b = Arc::new(Backend::from_instance(i));
            t.add_instance(b.clone());
            edits
                .entry(i.app.as_str())
                .or_insert_with(|| EntryEdit {
                    app: None,
                    instances: Vec::new(),
                    next: 0,
                })
                .instances
                .push(b);
        }
        for (name, e) in edits {
            t.apps.insert(name.to_string(), Arc::new(e.freeze()));
        }
        t
    }

    /// The table after `u`, sharing everything `u` does not touch with `self`, and the names
    /// of the apps whose entry changed (their backends, ports or policy).
    pub(crate) fn update(
        &self,
        u: &RouteUpdate,
        applied_index: u64,
    ) -> (RouteTable, BTreeSet<String>) {
        let mut t = self.clone();
        t.applied_index = applied_index;
        let mut edits: HashMap<String, EntryEdit> = HashMap::new();
        for (id, new) in &u.instances {
            let old = t.exact_instance(id).cloned();
            if old.as_deref() == new.as_ref() {
                // A renewal: nothing the data plane sees changed.
                continue;
            }
            if let Some(old) = old {
                t.remove_instance(&old);
                let e = EntryEdit::of(&mut edits, &t.apps, &old.app);
                if let Ok(pos) = e
                    .instances
                    .binary_search_by(|b| b.instance_id.as_str().cmp(id))
                {
                    e.instances.remove(pos);
                }
            }
            if let Some(new) = new {
                let b = Arc::new(new.clone());
                t.add_instance(b.clone());
                let e = EntryEdit::of(&mut edits, &t.apps, &b.app);
                match e
                    .instances
                    .binary_search_by(|x| x.instance_id.as_str().cmp(id))
                {
                    Ok(pos) => e.instances[pos] = b,
                    Err(pos) => e.instances.insert(pos, b),
                }
            }
        }
        for (name, app) in &u.apps {
            let unchanged = t.apps.get(name).map(|e| &e.app) == Some(app)
                || (app.is_none() && !t.apps.contains_key(name));
            if !unchanged {
                EntryEdit::of(&mut edits, &t.apps, name).app = app.clone();
            }
        }
        let mut changed = BTreeSet::new();
        for (name, e) in edits {
            if e.app.is_none() && e.instances.is_empty() {
                t.apps.remove(&name);
            } else {
                t.apps.insert(name.clone(), Arc::new(e.freeze()));
            }
            changed.insert(name);
        }
        let domains_changed = u
            .domains
            .iter()
            .any(|(name, d)| t.domains.get(name) != d.as_ref());
        if domains_changed {
            let mut domains = (*t.domains).clone();
            for (name, d) in &u.domains {
                match d {
                    Some(d) => domains.insert(name.clone(), d.clone()),
                    None => domains.remove(name),
                };
            }
            t.domains = Arc::new(domains);
        }
        (t, changed)
    }

    /// The instance with exactly this id.
    pub(crate) fn exact_instance(&self, id: &str) -> Option<&Arc<Backend>> {
        let key = id.to_ascii_lowercase();
        match self.instances.get(&key) {
            Some(b) if b.instance_id == id => Some(b),
            Some(_) => self
                .shadowed
                .get(&key)?
                .iter()
                .find(|b| b.instance_id == id),
            None => None,
        }
    }

    /// Adds `b` (absent before) to the case-insensitive index.
    fn add_instance(&mut self, b: Arc<Backend>) {
        let key = b.instance_id.to_ascii_lowercase();
        let loser = match self.instances.get(&key) {
            None => {
                self.instances.insert(key, b);
                return;
            }
            Some(w) if w.instance_id < b.instance_id => {
                let w = w.clone();
                self.instances.insert(key.clone(), b);
                w
            }
            Some(_) => b,
        };
        let mut v = self.shadowed.get(&key).cloned().unwrap_or_default();
        v.push(loser);
        self.shadowed.insert(key, v);
    }

    /// Removes `b` (present) from the case-insensitive index.
    fn remove_instance(&mut self, b: &Backend) {
        let key = b.instance_id.to_ascii_lowercase();
        let mut v = match self.shadowed.get(&key) {
            Some(v) => v.clone(),
            None => {
                self.instances.remove(&key);
                return;
            }
        };
        if self
            .instances
            .get(&key)
            .is_some_and(|w| w.instance_id == b.instance_id)
        {
            // The next greatest id takes over (lists are never stored empty).
            let next = v
                .iter()
                .enumerate()
                .max_by(|(_, x), (_, y)| x.instance_id.cmp(&y.instance_id))
                .map(|(i, _)| i);
            match next {
                Some(i) => {
                    let w = v.swap_remove(i);
                    self.instances.insert(key.clone(), w);
                }
                None => {
                    self.instances.remove(&key);
                }
            }
        } else {
            v.retain(|x| x.instance_id != b.instance_id);
        }
        if v.is_empty() {
            self.shadowed.remove(&key);
        } else {
            self.shadowed.insert(key, v);
        }
    }

    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// Everything the table holds, in a canonical order, for comparing two tables.
    #[cfg(test)]
    pub(crate) fn dump(&self) -> String {
        use std::collections::BTreeMap;
        type Apps = BTreeMap<String, (Option<AppInfo>, Vec<Backend>)>;
        let apps: Apps = self
            .apps
            .iter()
            .map(|(n, e)| {
                let v = e.instances.iter().map(|b| (**b).clone()).collect();
                (n.clone(), (e.app.clone(), v))
            })
            .collect();
        let instances: BTreeMap<_, _> = self.instances.iter().collect();
        let shadowed: BTreeMap<_, BTreeSet<&str>> = self
            .shadowed
            .iter()
            .map(|(k, v)| (k, v.iter().map(|b| b.instance_id.as_str()).collect()))
            .collect();
        let domains: BTreeMap<_, _> = self.domains.iter().collect();
        format!("{:#?}", (&self.bases, apps, instances, shadowed, domains))
    }

    /// An existing app's entry.
    fn app(&self, name: &str) -> Option<&AppEntry> {
        self.apps
            .get(name)
            .map(|e| e.as_ref())
            .filter(|e| e.app.is_some())
    }

    /// Every app name with an entry (existing apps, and names with leftover instances).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&String, &Arc<AppEntry>)> {
        self.apps.iter()
    }

    pub(crate) fn entry(&self, name: &str) -> Option<&Arc<AppEntry>> {
        self.apps.get(name)
    }

    /// An instance by id (case-insensitive, like host names).
    pub fn instance(&self, id: &str) -> Option<&Arc<Backend>> {
        // Ids are nearly always lower case already; the copy is per request.
        if id.bytes().any(|b| b.is_ascii_uppercase()) {
            self.instances.get(&id.to_ascii_lowercase())
        } else {
            self.instances.get(id)
        }
    }

    /// Every instance with the address its app's default port is served at: what health
    /// probes connect to.
    pub fn probe_targets(&self) -> Vec<(String, String)> {
        self.instances
            .values()
            .filter_map(|b| {
                let port = self.app(&b.app).and_then(|a| a.ports()?.first().copied())?;
                Some((b.instance_id.clone(), b.address(port, port)?.into_owned()))
            })
            .collect()
    }

    /// Resolves a host name (SNI or Host, without port).
    pub fn resolve(&self, host: &str) -> Result<Route, RouteError> {
        match grammar::parse_host(host, &self.bases)? {
            ParsedHost::Base { label, .. } => {
                if let Some(app) = self.app(&label.name) {
                    let declared = app
                        .ports()
                        .is_some_and(|ports| label.port.is_none_or(|p| ports.contains(&p)));
                    if declared {
                        return self.app_route(&label.name, app, label.port, label.mode);
                    }
                }
                if let Some(b) = self.instances.get(&label.whole) {
                    return self.pinned(b, None, Mode::Http);
                }
                if label.port.is_some() {
                    if let Some(b) = self.instances.get(&label.name) {
                        return self.pinned(b, label.port, label.mode);
                    }
                }
                let app = self
                    .app(&label.name)
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
                    .app(app_name)
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
            .app(app)
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
        let ports = app.ports().unwrap_or_default();
        let default_port = ports.first().copied().unwrap_or(80);
        let port = port.unwrap_or(default_port);
        if !ports.contains(&port) {
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

    /// The route to instance `b` alone, held to the ports its app declares (and, for a
    /// `host:port` backend, to that one port).
    fn pinned(&self, b: &Arc<Backend>, port: Option<u16>, mode: Mode) -> Result<Route, RouteError> {
        let ports = self
            .app(&b.app)
            .and_then(AppEntry::ports)
            .ok_or_else(|| RouteError::UnknownName(b.instance_id.clone()))?;
        let Some(&default_port) = ports.first() else {
            return Err(RouteError::UnknownName(b.instance_id.clone()));
        };
        let port = port.unwrap_or(default_port);
        if !ports.contains(&port) || b.address(port, default_port).is_none() {
            return Err(RouteError::UnknownPort {
                app: b.instance_id.clone(),
                port,
            });
        }
        Ok(Route {
            app: Arc::from(b.app.as_str()),
            port,
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
        let app = self.app(route.app.as_ref())?;
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
    use proptest::prelude::*;

    proptest! {
        /// The state's namespace rules (`port_form`) and the routing grammar must read a label
        /// the same way, or a name the state allows could route as something it refused.
        #[test]
        fn the_state_and_the_grammar_read_port_forms_alike(
            label in "[a-z0-9-]{1,10}(-[0-9]{1,6}[sg]{0,2})?"
        ) {
            let state = portcullis_raft::state::port_form(&label);
            match grammar::parse_label(&label) {
                Ok(l) => match l.port {
                    Some(p) => prop_assert_eq!(
                        state.map(|(n, port, suffix)| (n.to_string(), port, suffix)),
                        Some((l.name.clone(), u32::from(p), l.mode != Mode::Http))
                    ),
                    None => prop_assert!(state.is_none(), "{:?}", state),
                },
                // An invalid port or both suffixes: still a reserved form, never a plain name.
                Err(_) => prop_assert!(state.is_some()),
            }
        }
    }

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
    fn app_routes_win_over_instance_ids() {
        let mut s = state();
        // Collisions an older state may hold: an instance named like app `api`.
        s.instances.insert(
            "api".into(),
            Instance {
                instance_id: "api".into(),
                app: "web".into(),
                region: "r".into(),
                backend_addr: Some("127.0.0.3".into()),
                ..Default::default()
            },
        );
        let t = RouteTable::build(&s, &["apps.test".to_string()], 7);
        // `web-9000` is an instance of `api`, but app `web` declares port 9000: the app wins.
        let r = t.resolve("web-9000.apps.test").expect("route");
        assert_eq!(
            (r.app.as_ref(), r.port, r.pinned.is_none()),
            ("web", 9000, true)
        );
        let r = t.resolve("api.apps.test").expect("route");
        assert_eq!((r.app.as_ref(), r.pinned.is_none()), ("api", true));
        // An id that is no app route still pins (case-insensitively).
        let r = t.resolve("W1.apps.test").expect("route");
        assert_eq!(
            r.pinned.as_ref().map(|b| b.instance_id.as_str()),
            Some("w1")
        );
        let r = t.resolve("w2-9000g.apps.test").expect("route");
        assert_eq!((r.port, r.mode), (9000, Mode::H2c));
    }

    #[test]
    fn pinned_routes_reach_only_declared_ports() {
        let t = table();
        for host in ["w2-9999", "w2-1", "w2-65535s", "w2-22g", "web-9000-1"] {
            assert!(
                matches!(
                    t.resolve(&format!("{host}.apps.test")),
                    Err(RouteError::UnknownPort { .. } | RouteError::UnknownName(_))
                ),
                "{host}"
            );
        }
        // A `host:port` backend serves its one port (the app's default) and no other.
        assert!(t.resolve("w1-8080.apps.test").is_ok());
        assert_eq!(
            t.resolve("w1-9000.apps.test"),
            Err(RouteError::UnknownPort {
                app: "w1".into(),
                port: 9000
            })
        );
        // An instance whose app is gone routes nothing.
        let mut s = state();
        s.apps.remove("api");
        let t = RouteTable::build(&s, &["apps.test".to_string()], 7);
        assert_eq!(
            t.resolve("web-9000.apps.test").map(|r| r.pinned.is_none()),
            Ok(true)
        );
        assert!(t.resolve("web-9000-443.apps.test").is_err());
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
            None,
            "a host:port backend serves only the port it names"
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
