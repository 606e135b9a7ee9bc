//! The balancer: one geo [`Selector`] per app, compiled into an immutable [`Balance`] on every
//! routing-table rebuild, and the backends one request or connection tries ([`candidates`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use portcullis_geo::{
    Backend as GeoBackend, LbPolicy, LoadCounter, Location, Region, ReloadingGeoDb, SelectConfig,
    SelectInput, Selector,
};
use portcullis_raft::ClusterState;

use super::geo::{GeoConfig, GeoSource};
use super::health::{HealthConfig, InstanceHealth};
use crate::edge::route::{AppInfo, Backend as RouteBackend, Route, RouteTable};
use crate::edge::sharded::ShardedMap;
use crate::edge::Snapshot;

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
        let source = GeoSource::open(geo)?;
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
        self.geo.reloading()
    }

    /// Where `ip` probably is. Lock-free.
    pub fn locate(&self, ip: IpAddr) -> Option<Location> {
        self.geo.locate(ip)
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
pub use crate::edge::xff::effective_client;

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

/// One backend to try, in order, with what to count against it.
pub struct Candidate {
    pub backend: Arc<RouteBackend>,
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
    snap: &Snapshot,
    balancer: &Balancer,
    route: &Route,
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn snapshot(b: &Balancer, s: &ClusterState) -> Snapshot {
        Snapshot {
            routes: RouteTable::build(s, &["apps.test".to_string()], 1),
            certs: Default::default(),
            balance: b.build(s),
            waf: Default::default(),
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
}
