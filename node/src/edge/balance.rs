//! Backend choice for the data plane: one geo [`Selector`] per app, instance health, and the
//! client's location.
//!
//! [`Balancer`] is long-lived (one per edge). On every routing-table rebuild it compiles an
//! immutable [`Balance`] that goes into the snapshot next to the routes, so the request path
//! reads selectors and health without a lock. What must survive rebuilds — one
//! [`LoadCounter`] and one [`InstanceHealth`] per instance id — lives in the balancer's maps,
//! which only the rebuild touches. A rebuild after a change ([`Balancer::update`]) rebuilds
//! only the selectors of the apps whose instances, weights or policy changed and shares the
//! others with the previous [`Balance`].
//!
//! Health is local soft state (never written through Raft): every node probes every instance
//! itself (TCP connect or HTTP GET; rise/fall thresholds), and the proxy ejects an instance
//! after `passive_fall` consecutive connect failures seen by real requests.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_geo::{
    Backend as GeoBackend, GeoDb, LbPolicy, LoadCounter, Location, Region, ReloadingGeoDb,
    SelectConfig, SelectInput, Selector,
};
use portcullis_raft::ClusterState;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::route::{AppInfo, Backend as RouteBackend, RouteTable};
use super::sharded::ShardedMap;
use super::upstream::{connect_with_timeout, Target, Upstream};

/// The bundled DB-IP Lite country database. Embedded rather than looked up on disk so the
/// default works from any working directory and in a copied binary; a configured
/// `geo.database` replaces it (and is reloaded when the file changes).
static BUNDLED_DB: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/dbip-country.mmdb"
));

/// `[geo]`: the client-location database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GeoConfig {
    /// MaxMind-format database (City or country schema). Default: the bundled DB-IP Lite
    /// country database, compiled into the binary.
    pub database: Option<PathBuf>,
    /// How often to check `database` for changes, seconds. Default 60.
    pub reload_interval_secs: u64,
}

impl Default for GeoConfig {
    fn default() -> Self {
        GeoConfig {
            database: None,
            reload_interval_secs: 60,
        }
    }
}

/// `[health]`: node-wide active and passive health checking of instances.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Probe every instance this often, milliseconds. Default 2000.
    pub interval_ms: u64,
    /// A probe that takes longer fails, milliseconds. Default 1000.
    pub timeout_ms: u64,
    /// Consecutive successful probes that bring an unhealthy instance back. Default 2.
    pub rise: u32,
    /// Consecutive failed probes that take an instance out of rotation. Default 3.
    pub fall: u32,
    /// `GET` this path (2xx/3xx is healthy) instead of only connecting. Default: TCP connect.
    pub http_path: Option<String>,
    /// Consecutive connect failures of proxied requests that eject an instance until probes
    /// bring it back. Default 3; 0 disables passive ejection.
    pub passive_fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            http_path: None,
            passive_fall: 3,
        }
    }
}

impl HealthConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 || self.timeout_ms == 0 {
            return Err("health.interval_ms and health.timeout_ms must be > 0".into());
        }
        if self.rise == 0 || self.fall == 0 {
            return Err("health.rise and health.fall must be > 0".into());
        }
        if let Some(p) = &self.http_path {
            if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(format!(
                    "health.http_path {p:?} must be an absolute URL path"
                ));
            }
        }
        Ok(())
    }
}

/// One instance's health on this node. New instances start healthy so a fresh registration
/// serves at once; probes and passive failures take it out.
#[derive(Debug)]
pub struct InstanceHealth {
    healthy: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    passive_fails: AtomicU32,
}

impl Default for InstanceHealth {
    fn default() -> Self {
        InstanceHealth {
            healthy: AtomicBool::new(true),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            passive_fails: AtomicU32::new(0),
        }
    }
}

impl InstanceHealth {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records one probe; returns the new state when it changed. Only the prober calls this
    /// (one task), so the read-modify-write sequences do not race with each other.
    pub fn record_probe(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.fail_streak.store(0, Ordering::Relaxed);
            let n = self
                .ok_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if !self.is_healthy() && n >= rise {
                self.passive_fails.store(0, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.ok_streak.store(0, Ordering::Relaxed);
            let n = self
                .fail_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if self.is_healthy() && n >= fall {
                self.healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// A proxied request could not connect. Returns true when this ejected the instance.
    pub fn record_connect_failure(&self, passive_fall: u32) -> bool {
        if passive_fall == 0 {
            return false;
        }
        let n = self
            .passive_fails
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= passive_fall && self.healthy.swap(false, Ordering::Relaxed) {
            // Probes must now see `rise` successes in a row before it comes back.
            self.ok_streak.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// A proxied request connected.
    pub fn record_connect_success(&self) {
        if self.passive_fails.load(Ordering::Relaxed) != 0 {
            self.passive_fails.store(0, Ordering::Relaxed);
        }
    }
}

/// Where client locations come from.
enum GeoSource {
    Bundled(GeoDb),
    File(Arc<ReloadingGeoDb>),
}

#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("geo database: {0}")]
    Geo(#[from] portcullis_geo::GeoDbError),
}

/// Long-lived balancing state of one edge.
pub struct Balancer {
    geo: GeoSource,
    select: SelectConfig,
    /// This node's region and coordinates: always a known region, and the home region for
    /// clients with no location.
    home: Region,
    pub health: HealthConfig,
    loads: Mutex<HashMap<String, LoadCounter>>,
    healths: Mutex<HashMap<String, Arc<InstanceHealth>>>,
}

impl Balancer {
    pub fn new(
        geo: &GeoConfig,
        health: HealthConfig,
        region: &str,
        lat: f64,
        lon: f64,
    ) -> Result<Balancer, BalanceError> {
        let source = match &geo.database {
            Some(path) => GeoSource::File(Arc::new(ReloadingGeoDb::open(
                path.clone(),
                Duration::from_secs(geo.reload_interval_secs.max(1)),
            )?)),
            None => GeoSource::Bundled(GeoDb::from_bytes(
                BUNDLED_DB.to_vec(),
                "<bundled dbip-country.mmdb>",
            )?),
        };
        Ok(Balancer {
            geo: source,
            select: SelectConfig {
                home_region: Some(region.to_string()),
                ..Default::default()
            },
            home: Region {
                name: region.to_string(),
                lat,
                lon,
            },
            health,
            loads: Mutex::default(),
            healths: Mutex::default(),
        })
    }

    /// The reloading database, when one is configured (the caller runs its reload loop).
    pub fn reloading_db(&self) -> Option<Arc<ReloadingGeoDb>> {
        match &self.geo {
            GeoSource::File(db) => Some(db.clone()),
            GeoSource::Bundled(_) => None,
        }
    }

    /// Where `ip` probably is. Lock-free.
    pub fn locate(&self, ip: IpAddr) -> Option<Location> {
        match &self.geo {
            GeoSource::Bundled(db) => db.lookup(ip),
            GeoSource::File(db) => db.lookup(ip),
        }
    }

    /// Regions from the replicated state (`UpsertRegion`), then regions named by gateway
    /// nodes with their coordinates, then this node's own: the first definition of a name
    /// wins. Invalid coordinates are skipped rather than failing every geo app.
    pub(crate) fn regions(&self, state: &ClusterState) -> Vec<Region> {
        let mut out: Vec<Region> = Vec::new();
        let candidates = state
            .regions
            .values()
            .map(|r| (r.name.clone(), r.latitude, r.longitude))
            .chain(
                state
                    .nodes
                    .values()
                    .map(|n| (n.region.clone(), n.latitude, n.longitude)),
            )
            .chain(std::iter::once((
                self.home.name.clone(),
                self.home.lat,
                self.home.lon,
            )));
        for (name, lat, lon) in candidates {
            if out.iter().any(|r| r.name == name) {
                continue;
            }
            if let Ok(r) = Region::new(name, lat, lon) {
                out.push(r);
            }
        }
        out
    }

    /// Compiles selectors and the health view for `state`. Keeps load counters and health of
    /// instances that still exist; forgets the others.
    pub fn build(&self, state: &ClusterState) -> Balance {
        let routes = RouteTable::build(state, &[], 0);
        self.compile(&routes, weights_of(state), self.regions(state))
    }

    /// [`Balancer::build`] from a compiled route table (which holds every instance and app),
    /// the non-default instance weights and the regions.
    pub(crate) fn compile(
        &self,
        routes: &RouteTable,
        weights: ShardedMap<u32>,
        regions: Vec<Region>,
    ) -> Balance {
        let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
        let mut healths = self.healths.lock().unwrap_or_else(|p| p.into_inner());
        let live: HashSet<&str> = routes
            .entries()
            .flat_map(|(_, e)| e.instances.iter().map(|b| b.instance_id.as_str()))
            .collect();
        loads.retain(|id, _| live.contains(id.as_str()));
        healths.retain(|id, _| live.contains(id.as_str()));
        let mut health = ShardedMap::default();
        for id in live {
            let h = healths.entry(id.to_string()).or_default().clone();
            health.insert(id.to_string(), h);
        }
        let mut apps = ShardedMap::default();
        for (name, e) in routes.entries() {
            let Some(info) = &e.app else { continue };
            if let Some(s) = self.selector(name, info, &e.instances, &mut loads, &weights, &regions)
            {
                apps.insert(name.clone(), Arc::new(s));
            }
        }
        Balance {
            apps,
            health,
            weights,
            regions,
        }
    }

    /// The balance after a change: `prev` with the touched instances' health and weights
    /// (`None`: the instance is gone) and the selectors of `changed_apps` rebuilt from
    /// `routes`, the already updated table. Untouched selectors are shared with `prev`, so
    /// their round-robin positions and hash tables carry over. New regions rebuild the
    /// selectors of geo apps (the only ones that use regions).
    pub(crate) fn update(
        &self,
        prev: &Balance,
        routes: &RouteTable,
        changed_apps: &BTreeSet<String>,
        instances: &[(String, Option<u32>)],
        regions: Vec<Region>,
    ) -> Balance {
        let mut b = prev.clone();
        let mut rebuild: BTreeSet<&str> = changed_apps.iter().map(String::as_str).collect();
        let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
        let mut healths = self.healths.lock().unwrap_or_else(|p| p.into_inner());
        for (id, weight) in instances {
            let Some(weight) = weight else {
                loads.remove(id);
                healths.remove(id);
                b.health.remove(id);
                b.weights.remove(id);
                continue;
            };
            let h = healths.entry(id.clone()).or_default().clone();
            if b.health.get(id).is_none_or(|x| !Arc::ptr_eq(x, &h)) {
                b.health.insert(id.clone(), h);
            }
            if b.weights.get(id).copied().unwrap_or(1) != *weight {
                if *weight == 1 {
                    b.weights.remove(id);
                } else {
                    b.weights.insert(id.clone(), *weight);
                }
                if let Some(r) = routes.exact_instance(id) {
                    rebuild.insert(r.app.as_str());
                }
            }
        }
        if regions != b.regions {
            for (name, e) in routes.entries() {
                let geo = e
                    .app
                    .as_ref()
                    .is_some_and(|a| matches!(a.lb.parse::<LbPolicy>(), Ok(LbPolicy::Geo(_))));
                if geo {
                    rebuild.insert(name.as_str());
                }
            }
            b.regions = regions;
        }
        for name in rebuild {
            let selector = routes.entry(name).and_then(|e| {
                let info = e.app.as_ref()?;
                self.selector(name, info, &e.instances, &mut loads, &b.weights, &b.regions)
            });
            match selector {
                Some(s) => b.apps.insert(name.to_string(), Arc::new(s)),
                None => b.apps.remove(name),
            };
        }
        b
    }

    /// One app's selector, falling back to round robin when its policy cannot be built.
    fn selector(
        &self,
        name: &str,
        info: &AppInfo,
        instances: &[Arc<RouteBackend>],
        loads: &mut HashMap<String, LoadCounter>,
        weights: &ShardedMap<u32>,
        regions: &[Region],
    ) -> Option<Selector> {
        let backends: Vec<GeoBackend> = instances
            .iter()
            .map(|i| {
                let load = loads.entry(i.instance_id.clone()).or_default().clone();
                GeoBackend::new(i.instance_id.clone(), i.region.clone())
                    .with_load(load)
                    .with_weight(weights.get(&i.instance_id).copied().unwrap_or(1))
            })
            .collect();
        let policy = match info.lb.parse::<LbPolicy>() {
            Ok(p) => p,
            Err(e) => {
                // Validated on write; an older or foreign entry still gets served.
                tracing::warn!(app = %name, error = %e, "bad lb policy; using round-robin");
                LbPolicy::RoundRobin
            }
        };
        match Selector::build(&policy, backends.clone(), regions, &self.select) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(app = %name, error = %e, "cannot build selector; using round-robin");
                match Selector::build(&LbPolicy::RoundRobin, backends, regions, &self.select) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::error!(app = %name, error = %e, "no selector; app unavailable");
                        None
                    }
                }
            }
        }
    }
}

/// The instance weights of `state` other than the default 1, for instances that exist.
pub(crate) fn weights_of(state: &ClusterState) -> ShardedMap<u32> {
    state
        .instance_weights
        .iter()
        .filter(|(id, w)| **w != 1 && state.instances.contains_key(*id))
        .map(|(id, w)| (id.clone(), *w))
        .collect()
}

/// The weight of instance `id`, or `None` when it does not exist.
pub(crate) fn weight_of(state: &ClusterState, id: &str) -> Option<u32> {
    state
        .instances
        .contains_key(id)
        .then(|| state.instance_weights.get(id).copied().unwrap_or(1))
}

/// Selectors and health for one routing snapshot; immutable. Cloning is cheap (shared shards).
#[derive(Default, Clone)]
pub struct Balance {
    apps: ShardedMap<Arc<Selector>>,
    health: ShardedMap<Arc<InstanceHealth>>,
    /// Instance weights other than the default 1, for rebuilding one app's selector.
    weights: ShardedMap<u32>,
    regions: Vec<Region>,
}

impl Balance {
    pub fn selector(&self, app: &str) -> Option<&Selector> {
        self.apps.get(app).map(|s| s.as_ref())
    }

    pub fn health(&self, instance_id: &str) -> Option<&Arc<InstanceHealth>> {
        self.health.get(instance_id)
    }

    /// Unknown instances count as healthy: health only ever removes known-bad ones.
    pub fn is_healthy(&self, instance_id: &str) -> bool {
        self.health.get(instance_id).is_none_or(|h| h.is_healthy())
    }

    pub fn healths(&self) -> impl Iterator<Item = (&String, &Arc<InstanceHealth>)> {
        self.health.iter()
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Everything the balance holds, in a canonical order, for comparing two of them built
    /// by one balancer (health is compared by identity: it must be the balancer's object).
    #[cfg(test)]
    pub(crate) fn dump(&self) -> String {
        use std::collections::BTreeMap;
        let apps: BTreeMap<_, _> = self
            .apps
            .iter()
            .map(|(n, s)| {
                let b: Vec<_> = s
                    .backends()
                    .iter()
                    .map(|b| (b.id.clone(), b.region.clone(), b.weight, b.load.get()))
                    .collect();
                (n.clone(), (s.policy().clone(), b))
            })
            .collect();
        let health: BTreeMap<_, _> = self
            .health
            .iter()
            .map(|(id, h)| (id.clone(), Arc::as_ptr(h) as usize))
            .collect();
        let weights: BTreeMap<_, _> = self.weights.iter().collect();
        format!("{:#?}", (apps, health, weights, &self.regions))
    }

    /// The selector of `app`, shared or not with another balance.
    #[cfg(test)]
    pub(crate) fn selector_arc(&self, app: &str) -> Option<&Arc<Selector>> {
        self.apps.get(app)
    }
}

/// The bytes a policy hashes for one request: a header's value or a cookie's, when the policy
/// names one and the request carries it.
pub fn hash_key<'a>(policy: &LbPolicy, headers: &'a http::HeaderMap) -> Option<&'a [u8]> {
    use portcullis_geo::HashKey;
    match policy.hash_key()? {
        HashKey::ClientIp => None,
        HashKey::Header(name) => headers.get(name.as_str()).map(|v| v.as_bytes()),
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .find_map(|v| portcullis_geo::cookie_value(v.as_bytes(), name)),
    }
}

/// Lives in the pure `xff` file so that it is fuzzed.
pub use super::xff::effective_client;

/// The selection input for one request or connection.
pub fn input<'a>(
    client: IpAddr,
    location: Option<&'a Location>,
    key: Option<&'a [u8]>,
) -> SelectInput<'a> {
    SelectInput::new(client)
        .with_location(location)
        .with_hash_key(key)
}

/// One probe: connect through the upstream (the same path requests take), and with
/// `http_path` send a GET and require a 2xx/3xx status line. Everything under `timeout`.
pub async fn probe(
    upstream: &dyn Upstream,
    target: &Target,
    http_path: Option<&str>,
    timeout: Duration,
) -> bool {
    let run = async {
        let mut io = connect_with_timeout(upstream, target, timeout).await.ok()?;
        let Some(path) = http_path else {
            return Some(true);
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: portcullis-health\r\nConnection: close\r\n\r\n"
        );
        io.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            let r = io.read(&mut buf[n..]).await.ok()?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code: u16 = line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, run).await, Ok(Some(true)))
}

/// One backend to try, in order, with what to count against it.
pub struct Candidate {
    pub backend: Arc<super::route::Backend>,
    pub load: Option<LoadCounter>,
    pub health: Option<Arc<InstanceHealth>>,
}

/// Why a route has nothing to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCandidate {
    /// The app has no instances at all.
    NoInstances,
    /// It has instances, but every one is unhealthy on this node.
    NoneHealthy,
}

/// The backends to try for one request or connection, best first: the pinned instance, or up
/// to `max` healthy choices from the app's selector. Synchronous and lock-free; the caller
/// holds the snapshot `Arc`, not a lock, across its connects.
pub fn candidates(
    snap: &super::Snapshot,
    balancer: &Balancer,
    route: &super::route::Route,
    client: IpAddr,
    headers: Option<&http::HeaderMap>,
    max: usize,
) -> Result<Vec<Candidate>, NoCandidate> {
    if let Some(b) = &route.pinned {
        // An instance named explicitly is served even when probes think it is down: that is
        // how operators debug it.
        return Ok(vec![Candidate {
            backend: b.clone(),
            load: None,
            health: snap.balance.health(&b.instance_id).cloned(),
        }]);
    }
    let Some(selector) = snap.balance.selector(&route.app) else {
        return Err(NoCandidate::NoInstances);
    };
    if selector.backends().is_empty() {
        return Err(NoCandidate::NoInstances);
    }
    let location = match selector.policy() {
        LbPolicy::Geo(_) => balancer.locate(client),
        _ => None,
    };
    let key = headers.and_then(|h| hash_key(selector.policy(), h));
    let input = input(client, location.as_ref(), key);
    let out: Vec<Candidate> = selector
        .iter(&input)
        .filter_map(|b| {
            // Unknown instances count as healthy, as in `is_healthy`.
            let health = snap.balance.health(&b.id);
            if !health.is_none_or(|h| h.is_healthy()) {
                return None;
            }
            Some(Candidate {
                backend: snap.routes.instance(&b.id)?.clone(),
                load: Some(b.load.clone()),
                health: health.cloned(),
            })
        })
        .take(max.max(1))
        .collect();
    if out.is_empty() {
        return Err(NoCandidate::NoneHealthy);
    }
    Ok(out)
}

/// Probes every instance from this node, forever: one round per `interval_ms`, all probes of
/// a round concurrently, each under `timeout_ms`. Reads the current snapshot each round, so
/// instances added or removed are picked up without a restart.
pub async fn probe_loop(
    snapshot: Arc<arc_swap::ArcSwap<super::Snapshot>>,
    upstream: Arc<dyn Upstream>,
    cfg: HealthConfig,
    metrics: Arc<crate::metrics::EdgeMetrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: std::collections::HashSet<String> = Default::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = snapshot.load_full();
        // Removed instances stop being reported instead of showing their last state forever.
        reported.retain(|id| {
            let keep = snap.balance.health(id).is_some();
            if !keep {
                let labels = crate::metrics::InstanceLabels {
                    instance: id.clone(),
                };
                metrics.backend_healthy.remove(&labels);
                metrics.health_probe_failures.remove(&labels);
            }
            keep
        });
        let mut round = tokio::task::JoinSet::new();
        for (id, addr) in snap.routes.probe_targets() {
            let (Some(health), Some(target)) =
                (snap.balance.health(&id).cloned(), Target::parse(&addr))
            else {
                continue;
            };
            let upstream = upstream.clone();
            let path = cfg.http_path.clone();
            round.spawn(async move {
                let ok = probe(upstream.as_ref(), &target, path.as_deref(), timeout).await;
                (id, health, target, ok)
            });
        }
        drop(snap);
        while let Some(r) = round.join_next().await {
            let Ok((id, health, target, ok)) = r else {
                continue;
            };
            let labels = crate::metrics::InstanceLabels {
                instance: id.clone(),
            };
            if !ok {
                metrics.health_probe_failures.get_or_create(&labels).inc();
            }
            match health.record_probe(ok, cfg.rise, cfg.fall) {
                Some(true) => {
                    tracing::info!(instance = %id, backend = %target, "instance healthy again")
                }
                Some(false) => {
                    tracing::warn!(instance = %id, backend = %target, fall = cfg.fall, "instance out of rotation: probes failing")
                }
                None => {}
            }
            metrics
                .backend_healthy
                .get_or_create(&labels)
                .set(i64::from(health.is_healthy()));
            reported.insert(id);
        }
    }
}

/// Re-reads a configured geo database when its file changes. The check stats the file, so it
/// runs on the blocking pool; lookups keep using the loaded copy meanwhile.
pub async fn geo_reload_loop(
    db: Arc<ReloadingGeoDb>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(db.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let d = db.clone();
        match tokio::task::spawn_blocking(move || d.maybe_reload()).await {
            Ok(Ok(portcullis_geo::ReloadOutcome::Reloaded)) => {
                tracing::info!(path = %db.path().display(), generation = db.generation(), "geo database reloaded")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(path = %db.path().display(), error = %e, "geo database reload failed")
            }
            Err(e) => tracing::error!(error = %e, "geo database reload panicked"),
        }
    }
}

/// Writes this node's region and coordinates into the replicated state (`UpsertRegion`) unless
/// the state already defines that region, so every gateway can rank every region: a node knows
/// its own coordinates from its config; the others learn them here. Retries until the cluster
/// accepts the write (it may not have a leader yet at start-up).
pub async fn announce_region(
    cluster: portcullis_raft::Cluster,
    shared: portcullis_raft::store::SharedState,
    region: portcullis_raft::state::Region,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if shared.read().state.regions.contains_key(&region.name) {
            return;
        }
        match cluster
            .write(portcullis_raft::Command::UpsertRegion(region.clone()))
            .await
        {
            Ok(_) => {
                tracing::info!(region = %region.name, lat = region.latitude, lon = region.longitude, "region announced");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "region announcement not accepted yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_thresholds() {
        let h = InstanceHealth::default();
        assert!(h.is_healthy());
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), Some(false));
        assert!(!h.is_healthy());
        assert_eq!(h.record_probe(true, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), Some(true));
        assert!(h.is_healthy());
    }

    #[test]
    fn passive_ejection() {
        let h = InstanceHealth::default();
        assert!(!h.record_connect_failure(2));
        h.record_connect_success();
        assert!(!h.record_connect_failure(2));
        assert!(h.record_connect_failure(2));
        assert!(!h.is_healthy());
        assert_eq!(h.record_probe(true, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), Some(true));
        assert!(!InstanceHealth::default().record_connect_failure(0));
    }

    #[test]
    fn xff_only_from_trusted() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.1.1.1, 8.8.8.8".parse().expect("literal"),
        );
        let proxy: IpAddr = "10.0.0.1".parse().expect("literal");
        assert_eq!(
            effective_client(proxy, &h, |_| true),
            "8.8.8.8".parse::<IpAddr>().expect("literal")
        );
        assert_eq!(effective_client(proxy, &h, |_| false), proxy);
    }

    #[test]
    fn bundled_db_locates() {
        let b = Balancer::new(
            &GeoConfig::default(),
            HealthConfig::default(),
            "r",
            0.0,
            0.0,
        )
        .expect("bundled db");
        let l = b
            .locate("8.8.8.8".parse().expect("literal"))
            .expect("located");
        assert_eq!(l.country.as_deref(), Some("US"));
        assert!(b.locate("10.0.0.1".parse().expect("literal")).is_none());
        assert!(b.reloading_db().is_none());
    }

    #[test]
    fn configured_db_is_watched() {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../data/dbip-country.mmdb"
        ));
        let cfg = GeoConfig {
            database: Some(path.clone()),
            reload_interval_secs: 1,
        };
        let b = Balancer::new(&cfg, HealthConfig::default(), "r", 0.0, 0.0).expect("db");
        let db = b.reloading_db().expect("reloading");
        assert_eq!(db.path(), path.as_path());
        let l = b
            .locate("14.139.1.1".parse().expect("literal"))
            .expect("located");
        assert_eq!(l.country.as_deref(), Some("IN"));
        let missing = GeoConfig {
            database: Some(PathBuf::from("/nonexistent/geo.mmdb")),
            reload_interval_secs: 1,
        };
        let err = Balancer::new(&missing, HealthConfig::default(), "r", 0.0, 0.0)
            .err()
            .expect("missing file fails");
        assert!(err.to_string().contains("/nonexistent/geo.mmdb"), "{err}");
    }

    fn state(lb: &str) -> ClusterState {
        use portcullis_raft::state::{App, Instance};
        let mut s = ClusterState::default();
        s.apps.insert(
            "web".into(),
            App {
                name: "web".into(),
                ports: vec![8080],
                lb: lb.into(),
                revision: 1,
            },
        );
        for id in ["w1", "w2", "w3"] {
            s.instances.insert(
                id.into(),
                Instance {
                    instance_id: id.into(),
                    app: "web".into(),
                    region: "r".into(),
                    backend_addr: Some(format!("127.0.0.1:{}", 10000 + id.len())),
                    ..Default::default()
                },
            );
        }
        s
    }

    fn snapshot(b: &Balancer, s: &ClusterState) -> super::super::Snapshot {
        super::super::Snapshot {
            routes: super::super::route::RouteTable::build(s, &["apps.test".to_string()], 1),
            certs: Default::default(),
            balance: b.build(s),
        }
    }

    fn ids(c: &[Candidate]) -> Vec<String> {
        c.iter().map(|c| c.backend.instance_id.clone()).collect()
    }

    #[test]
    fn candidates_follow_policy_and_health() {
        let b = Balancer::new(
            &GeoConfig::default(),
            HealthConfig::default(),
            "r",
            0.0,
            0.0,
        )
        .expect("balancer");
        let s = state("hash:header=x-user");
        let snap = snapshot(&b, &s);
        let route = snap.routes.resolve("web.apps.test").expect("route");
        let ip: IpAddr = "192.0.2.1".parse().expect("literal");
        let mut h = http::HeaderMap::new();
        h.insert("x-user", "alice".parse().expect("literal"));
        let first = candidates(&snap, &b, &route, ip, Some(&h), 3).expect("some");
        assert_eq!(first.len(), 3, "every instance once");
        // Same key, different client address: same order (the header is hashed).
        let other: IpAddr = "198.51.100.7".parse().expect("literal");
        let again = candidates(&snap, &b, &route, other, Some(&h), 3).expect("some");
        assert_eq!(ids(&first), ids(&again));

        // The first choice goes down: the next choice is first; health survives a rebuild.
        let down = first[0].backend.instance_id.clone();
        snap.balance
            .health(&down)
            .expect("health")
            .record_connect_failure(1);
        let snap = snapshot(&b, &s);
        let after = candidates(&snap, &b, &route, ip, Some(&h), 3).expect("some");
        assert_eq!(ids(&after), ids(&first)[1..].to_vec());

        // Load counters survive a rebuild too.
        let _g = after[0].load.as_ref().expect("load").acquire();
        let snap2 = snapshot(&b, &s);
        let again = candidates(&snap2, &b, &route, ip, Some(&h), 3).expect("some");
        // (Bounded load may now put another instance first; find the loaded one by id.)
        let same = again
            .iter()
            .find(|c| c.backend.instance_id == after[0].backend.instance_id)
            .expect("still a candidate");
        assert_eq!(same.load.as_ref().expect("load").get(), 1);

        for id in ["w1", "w2", "w3"] {
            snap2
                .balance
                .health(id)
                .expect("h")
                .record_connect_failure(1);
        }
        assert_eq!(
            candidates(&snap2, &b, &route, ip, Some(&h), 3).err(),
            Some(NoCandidate::NoneHealthy)
        );
    }

    #[tokio::test]
    async fn http_probe_checks_status() {
        use tokio::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let up = super::super::upstream::TcpUpstream;
        let t = Target::parse(&addr.to_string()).expect("target");
        let d = Duration::from_secs(2);
        assert!(probe(&up, &t, Some("/healthz"), d).await);
        assert!(!probe(&up, &t, Some("/healthz"), d).await);
        // Nothing listens any more once the task is done; a plain connect probe fails.
        let closed = Target::parse("127.0.0.1:1").expect("target");
        assert!(!probe(&up, &closed, None, d).await);
    }

    #[test]
    fn health_config_validation() {
        assert!(HealthConfig::default().validate().is_ok());
        let bad = HealthConfig {
            fall: 0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = HealthConfig {
            http_path: Some("healthz".into()),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
