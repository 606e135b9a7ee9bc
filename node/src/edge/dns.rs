//! DNS TXT lookups with a TTL-aware cache, for custom domains (docs/custom-domains.md).
//!
//! The data plane asks for `_dstack-app-address.<domain>` on the request path, so every lookup
//! is async, bounded by a deadline, and answered from the cache while the record's TTL lasts.
//! Concurrent misses for one name share a single query. Failures (NXDOMAIN, no TXT, timeouts,
//! server failures) are cached too, for `negative_ttl_secs`, in a separate cache with its own
//! capacity, so a burst of names that do not resolve can neither grow memory nor hammer the
//! nameserver.
//!
//! hickory's own cache is switched off (`cache_size = 0`): TTL clamping, the negative bound and
//! the fresh lookups that `domain verify` needs are easier to reason about in one place.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::TokioResolver;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::config::error::{bad, ConfigError};

/// `[dns]`: how the node resolves the TXT records of custom domains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Nameservers as `ip:port`, queried over UDP (TCP when a reply is truncated). Empty: the
    /// system configuration (`/etc/resolv.conf`). Default empty.
    pub nameservers: Vec<SocketAddr>,
    /// Time for one query to one nameserver, milliseconds. Default 2000.
    pub timeout_ms: u64,
    /// Tries per lookup (the first plus retries). Default 2.
    pub attempts: usize,
    /// Cap on how long a positive answer is kept, seconds, whatever its TTL says. Default 300.
    pub max_ttl_secs: u64,
    /// How long a failed lookup (no such name, no TXT record, timeout, server failure) is
    /// remembered, seconds. Default 30.
    pub negative_ttl_secs: u64,
    /// Positive answers kept at most (names). Default 10000.
    pub cache_capacity: usize,
    /// Failed lookups kept at most (names). Default 1000.
    pub negative_cache_capacity: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout_ms: 2000,
            attempts: 2,
            max_ttl_secs: 300,
            negative_ttl_secs: 30,
            cache_capacity: 10_000,
            negative_cache_capacity: 1000,
        }
    }
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(50..=30_000).contains(&self.timeout_ms) {
            return Err(bad(
                "dns.timeout_ms",
                format!("{} must be within 50..=30000", self.timeout_ms),
            ));
        }
        if !(1..=5).contains(&self.attempts) {
            return Err(bad(
                "dns.attempts",
                format!("{} must be within 1..=5", self.attempts),
            ));
        }
        if !(1..=86_400).contains(&self.max_ttl_secs) {
            return Err(bad(
                "dns.max_ttl_secs",
                format!("{} must be within 1..=86400", self.max_ttl_secs),
            ));
        }
        if !(1..=3600).contains(&self.negative_ttl_secs) {
            return Err(bad(
                "dns.negative_ttl_secs",
                format!("{} must be within 1..=3600", self.negative_ttl_secs),
            ));
        }
        for (field, n) in [
            ("dns.cache_capacity", self.cache_capacity),
            ("dns.negative_cache_capacity", self.negative_cache_capacity),
        ] {
            if !(1..=1_000_000).contains(&n) {
                return Err(bad(field, format!("{n} must be within 1..=1000000")));
            }
        }
        for ns in &self.nameservers {
            if ns.port() == 0 || ns.ip().is_unspecified() {
                return Err(bad(
                    "dns.nameservers",
                    format!("{ns} is not a nameserver address"),
                ));
            }
        }
        Ok(())
    }

    /// The most one lookup may take, all tries included: the request path never waits longer.
    pub fn deadline(&self) -> Duration {
        // One extra timeout of slack for hickory's own bookkeeping (TCP retry on truncation).
        Duration::from_millis(self.timeout_ms.saturating_mul(self.attempts as u64 + 1))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheOutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheKindLabels {
    pub cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnroutedLabels {
    pub reason: &'static str,
}

/// `portcullis_dns_*` and `portcullis_custom_domain_*`. Every label is a fixed word: names
/// looked up come from clients (SNI), so they never become labels.
pub struct DnsMetrics {
    /// Queries sent to the nameservers, by result (`ok`, `not_found`, `timeout`, `error`).
    pub lookups: Family<DnsResultLabels, Counter>,
    pub lookup_duration: Family<DnsResultLabels, Histogram, fn() -> Histogram>,
    /// Cache consultations by outcome (`hit`, `miss`, `refresh` = hit that started a refresh).
    pub cache: Family<CacheOutcomeLabels, Counter>,
    /// Names held, by cache (`positive`, `negative`).
    pub entries: Family<CacheKindLabels, Gauge>,
    /// Requests for a verified custom domain that were not routed, by reason (`other_app`,
    /// `ambiguous`, `lookup`).
    pub unrouted: Family<UnroutedLabels, Counter>,
}

fn dns_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: covers a local resolver and the longest configurable deadline.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            lookups: Family::default(),
            lookup_duration: Family::new_with_constructor(dns_histogram),
            cache: Family::default(),
            entries: Family::default(),
            unrouted: Family::default(),
        }
    }
}

impl DnsMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = DnsMetrics::default();
        r.register(
            "portcullis_dns_lookups",
            "TXT queries sent to the nameservers, by result",
            m.lookups.clone(),
        );
        r.register(
            "portcullis_dns_lookup_duration_seconds",
            "Time for one TXT lookup, by result",
            m.lookup_duration.clone(),
        );
        r.register(
            "portcullis_dns_cache_requests",
            "TXT cache consultations by outcome (hit, miss, refresh)",
            m.cache.clone(),
        );
        r.register(
            "portcullis_dns_cache_entries",
            "Names held in the TXT cache (positive, negative)",
            m.entries.clone(),
        );
        r.register(
            "portcullis_custom_domain_unrouted",
            "Requests for verified custom domains refused because _dstack-app-address disagreed, by reason",
            m.unrouted.clone(),
        );
        m
    }
}

/// Why a TXT lookup gave no records. Cloneable: one answer is shared by every waiter and cached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("{0}: no such name or no TXT record")]
    NotFound(String),
    #[error("{name}: no answer within {after:?}")]
    Timeout { name: String, after: Duration },
    #[error("{name}: lookup failed: {reason}")]
    Failed { name: String, reason: String },
    #[error("cannot build a DNS resolver: {0}")]
    Setup(String),
}

/// One lookup's outcome: the TXT records (each record's strings joined), or why there are none.
pub type TxtAnswer = Result<Arc<[String]>, DnsError>;

struct Entry {
    answer: TxtAnswer,
    expires: Instant,
    /// After this, a hit still answers but also starts a background refresh.
    refresh_at: Instant,
    /// Key into the expiry index, so the entry can be found and dropped from it.
    seq: u64,
}

/// A capacity-bounded map of answers that expire. When full, expired entries go first, then
/// the one that would expire soonest: the cache never holds more than `capacity` names.
struct Bounded {
    capacity: usize,
    entries: HashMap<String, Entry>,
    /// (expiry, insertion sequence) → name; the front is the next to expire.
    by_expiry: BTreeMap<(Instant, u64), String>,
    next_seq: u64,
}

impl Bounded {
    fn new(capacity: usize) -> Self {
        Bounded {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            next_seq: 0,
        }
    }

    fn get(&mut self, name: &str, now: Instant) -> Option<Hit> {
        let e = self.entries.get(name)?;
        if e.expires > now {
            return Some(Hit {
                answer: e.answer.clone(),
                refresh: now >= e.refresh_at,
            });
        }
        self.remove(name);
        None
    }

    fn remove(&mut self, name: &str) {
        if let Some(e) = self.entries.remove(name) {
            self.by_expiry.remove(&(e.expires, e.seq));
        }
    }

    fn insert(
        &mut self,
        name: String,
        answer: TxtAnswer,
        (refresh_at, expires): (Instant, Instant),
        now: Instant,
    ) {
        self.remove(&name);
        while self.entries.len() >= self.capacity {
            // The soonest expiry is either already expired or the least valuable to keep.
            let Some(((_, _), victim)) = self.by_expiry.pop_first() else {
                break;
            };
            self.entries.remove(&victim);
        }
        // Expired entries would be refused by `get` anyway; dropping them keeps the map small.
        while let Some(((exp, _), _)) = self.by_expiry.first_key_value() {
            if *exp > now {
                break;
            }
            if let Some(((_, _), victim)) = self.by_expiry.pop_first() {
                self.entries.remove(&victim);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_expiry.insert((expires, seq), name.clone());
        self.entries.insert(
            name,
            Entry {
                answer,
                expires,
                refresh_at,
                seq,
            },
        );
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

struct Hit {
    answer: TxtAnswer,
    /// The entry is in its refresh-ahead window.
    refresh: bool,
}

/// Positive and negative answers, each bounded, with TTL clamping.
pub struct TxtCache {
    positive: Bounded,
    negative: Bounded,
    max_ttl: Duration,
    negative_ttl: Duration,
}

impl TxtCache {
    pub fn new(cfg: &DnsConfig) -> Self {
        TxtCache {
            positive: Bounded::new(cfg.cache_capacity),
            negative: Bounded::new(cfg.negative_cache_capacity),
            max_ttl: Duration::from_secs(cfg.max_ttl_secs),
            negative_ttl: Duration::from_secs(cfg.negative_ttl_secs),
        }
    }

    /// A cached answer that has not expired.
    pub fn get(&mut self, name: &str, now: Instant) -> Option<TxtAnswer> {
        self.hit(name, now).map(|h| h.answer)
    }

    fn hit(&mut self, name: &str, now: Instant) -> Option<Hit> {
        if let Some(h) = self.positive.get(name, now) {
            return Some(h);
        }
        self.negative.get(name, now)
    }

    /// Stores an answer. `ttl` is the smallest TTL among the records (ignored for failures).
    /// A TTL of 0 still caches for a second: without a floor, a record published with TTL 0
    /// would send every request to the nameserver.
    pub fn put(&mut self, name: &str, answer: TxtAnswer, ttl: Duration, now: Instant) {
        match &answer {
            Ok(_) => {
                self.negative.remove(name);
                let ttl = ttl.clamp(
                    Duration::from_secs(1),
                    self.max_ttl.max(Duration::from_secs(1)),
                );
                // Refresh ahead in the last quarter of the TTL: a name in use is looked up
                // again before it expires, so its requests never wait for the nameserver.
                let refresh_at = now + ttl.mul_f64(0.75);
                self.positive
                    .insert(name.to_string(), answer, (refresh_at, now + ttl), now);
            }
            Err(e) => {
                if !matches!(e, DnsError::NotFound(_)) && self.positive.get(name, now).is_some() {
                    // A timeout or server failure while refreshing says nothing about the
                    // record: the answer we hold stays good until its own TTL runs out.
                    return;
                }
                // "No such record" is authoritative: the owner removed it; stop using ours.
                self.positive.remove(name);
                let expires = now + self.negative_ttl;
                self.negative
                    .insert(name.to_string(), answer, (expires, expires), now);
            }
        }
    }

    /// (positive, negative) entries held.
    pub fn len(&self) -> (usize, usize) {
        (self.positive.len(), self.negative.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

/// Where answers come from. The real one is hickory; the trait keeps the cache and the
/// coalescing testable without a nameserver.
#[async_trait::async_trait]
pub trait TxtSource: Send + Sync + 'static {
    /// The TXT records of `name` and the smallest TTL among them.
    async fn txt(&self, name: &str) -> Result<(Vec<String>, Duration), DnsError>;
}

/// hickory-resolver over UDP/TCP.
pub struct HickorySource {
    resolver: TokioResolver,
    /// Per-query timeout × tries, for messages.
    timeout: Duration,
}

impl HickorySource {
    pub fn new(cfg: &DnsConfig) -> Result<Self, DnsError> {
        let builder = if cfg.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| DnsError::Setup(e.to_string()))?
        } else {
            // Configured nameservers replace the system ones entirely: no search domains, no
            // resolv.conf, so a test or an operator gets exactly the servers named.
            let mut rc = ResolverConfig::new();
            for ns in &cfg.nameservers {
                rc.add_name_server(NameServerConfig::new(*ns, Protocol::Udp));
                rc.add_name_server(NameServerConfig::new(*ns, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(rc, TokioConnectionProvider::default())
        };
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_millis(cfg.timeout_ms);
        opts.attempts = cfg.attempts.saturating_sub(1);
        opts.cache_size = 0;
        // Names are always absolute (`_dstack-app-address.api.example.org.`): never try search
        // domains, which would turn one lookup into several.
        opts.ndots = 0;
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        opts.edns0 = true;
        Ok(HickorySource {
            resolver: builder.with_options(opts).build(),
            timeout: Duration::from_millis(cfg.timeout_ms.saturating_mul(cfg.attempts as u64)),
        })
    }
}

#[async_trait::async_trait]
impl TxtSource for HickorySource {
    async fn txt(&self, name: &str) -> Result<(Vec<String>, Duration), DnsError> {
        // A trailing dot makes the name fully qualified, so no search list applies.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.txt_lookup(fqdn).await {
            Ok(lookup) => {
                let mut ttl = u32::MAX;
                let mut out = Vec::new();
                for r in lookup.as_lookup().record_iter() {
                    if let RData::TXT(txt) = r.data() {
                        ttl = ttl.min(r.ttl());
                        let mut s = String::new();
                        for part in txt.iter() {
                            s.push_str(&String::from_utf8_lossy(part));
                        }
                        out.push(s);
                    }
                }
                if out.is_empty() {
                    return Err(DnsError::NotFound(name.to_string()));
                }
                Ok((out, Duration::from_secs(u64::from(ttl))))
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                Err(DnsError::NotFound(name.to_string()))
            }
            Err(e)
                if e.proto()
                    .is_some_and(|p| matches!(p.kind(), ProtoErrorKind::Timeout)) =>
            {
                Err(DnsError::Timeout {
                    name: name.to_string(),
                    after: self.timeout,
                })
            }
            Err(e) => Err(DnsError::Failed {
                name: name.to_string(),
                reason: e.to_string(),
            }),
        }
    }
}

type Pending = Shared<BoxFuture<'static, TxtAnswer>>;

struct Inner {
    source: Arc<dyn TxtSource>,
    cache: Mutex<TxtCache>,
    inflight: Mutex<HashMap<String, Pending>>,
    deadline: Duration,
    metrics: Arc<DnsMetrics>,
}

/// Cached, coalesced, deadline-bounded TXT lookups. Cheap to clone.
#[derive(Clone)]
pub struct TxtResolver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TxtResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxtResolver")
            .field("deadline", &self.inner.deadline)
            .finish()
    }
}

impl TxtResolver {
    /// The real resolver from `[dns]`.
    pub fn from_config(cfg: &DnsConfig, metrics: Arc<DnsMetrics>) -> Result<Self, DnsError> {
        Ok(Self::with_source(cfg, Arc::new(HickorySource::new(cfg)?)).with_metrics(metrics))
    }

    /// A resolver over any source, with unregistered metrics (tests).
    pub fn with_source(cfg: &DnsConfig, source: Arc<dyn TxtSource>) -> Self {
        TxtResolver {
            inner: Arc::new(Inner {
                source,
                cache: Mutex::new(TxtCache::new(cfg)),
                inflight: Mutex::new(HashMap::new()),
                deadline: cfg.deadline(),
                metrics: Arc::new(DnsMetrics::default()),
            }),
        }
    }

    /// Reports into `metrics` (call before the resolver is shared).
    pub fn with_metrics(mut self, metrics: Arc<DnsMetrics>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.metrics = metrics,
            None => tracing::warn!("dns metrics attached after the resolver was shared; ignored"),
        }
        self
    }

    pub fn metrics(&self) -> &DnsMetrics {
        &self.inner.metrics
    }

    /// TXT records of `name` through the cache. Never waits longer than the configured deadline.
    pub async fn lookup(&self, name: &str) -> TxtAnswer {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let hit = self.cache().hit(&name, Instant::now());
        let outcome = |o| CacheOutcomeLabels { outcome: o };
        if let Some(h) = hit {
            if h.refresh {
                self.inner
                    .metrics
                    .cache
                    .get_or_create(&outcome("refresh"))
                    .inc();
                // Joins a refresh already running; the spawned task fills the cache.
                drop(self.pending(name, false));
            } else {
                self.inner
                    .metrics
                    .cache
                    .get_or_create(&outcome("hit"))
                    .inc();
            }
            return h.answer;
        }
        self.inner
            .metrics
            .cache
            .get_or_create(&outcome("miss"))
            .inc();
        self.query(name, false).await
    }

    /// TXT records of `name` straight from the nameserver (the cache is refreshed with the
    /// answer). For `domain verify`: the operator has just created the records, and a cached
    /// "not found" from a minute ago must not hide them.
    pub async fn lookup_fresh(&self, name: &str) -> TxtAnswer {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.query(name, true).await
    }

    /// (positive, negative) cache entries.
    pub fn cache_len(&self) -> (usize, usize) {
        self.cache().len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TxtCache> {
        // The cache holds no invariant a panic could break halfway; keep serving.
        self.inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn query(&self, name: String, fresh: bool) -> TxtAnswer {
        self.pending(name, fresh).await
    }

    /// The lookup of `name` in flight, started if there is none (or if `fresh`).
    fn pending(&self, name: String, fresh: bool) -> Pending {
        let mut inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match inflight.get(&name) {
            // A fresh lookup must not join one that started before the records changed.
            Some(p) if !fresh => p.clone(),
            _ if fresh => self.start(name, false),
            _ => {
                let p = self.start(name.clone(), true);
                inflight.insert(name, p.clone());
                p
            }
        }
    }

    /// Runs the query in its own task, so it finishes (and fills the cache) even when the
    /// request that started it goes away.
    /// `registered`: the lookup is in `inflight` and must take itself out when done.
    fn start(&self, name: String, registered: bool) -> Pending {
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(inner.deadline, inner.source.txt(&name)).await;
            let (answer, ttl) = match result {
                Ok(Ok((records, ttl))) => (Ok(Arc::from(records)), ttl),
                Ok(Err(e)) => (Err(e), Duration::ZERO),
                Err(_) => (
                    Err(DnsError::Timeout {
                        name: name.clone(),
                        after: inner.deadline,
                    }),
                    Duration::ZERO,
                ),
            };
            if let Err(e) = &answer {
                tracing::debug!(name = %name, error = %e, "txt lookup failed");
            }
            let result = DnsResultLabels {
                result: match &answer {
                    Ok(_) => "ok",
                    Err(DnsError::NotFound(_)) => "not_found",
                    Err(DnsError::Timeout { .. }) => "timeout",
                    Err(_) => "error",
                },
            };
            inner.metrics.lookups.get_or_create(&result).inc();
            inner
                .metrics
                .lookup_duration
                .get_or_create(&result)
                .observe(started.elapsed().as_secs_f64());
            let (positive, negative) = {
                let mut cache = inner.cache.lock().unwrap_or_else(PoisonError::into_inner);
                cache.put(&name, answer.clone(), ttl, started);
                cache.len()
            };
            for (kind, n) in [("positive", positive), ("negative", negative)] {
                inner
                    .metrics
                    .entries
                    .get_or_create(&CacheKindLabels { cache: kind })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            if registered {
                inner
                    .inflight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&name);
            }
            answer
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(DnsError::Failed {
                    name: String::new(),
                    reason: format!("lookup task ended: {e}"),
                })
            })
        }
        .boxed()
        .shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cfg() -> DnsConfig {
        DnsConfig {
            max_ttl_secs: 60,
            negative_ttl_secs: 5,
            cache_capacity: 3,
            negative_cache_capacity: 2,
            ..Default::default()
        }
    }

    fn ok(s: &str) -> TxtAnswer {
        Ok(Arc::from(vec![s.to_string()]))
    }

    #[test]
    fn positive_entries_expire_with_their_ttl_and_the_cap() {
        let mut c = TxtCache::new(&cfg());
        let t0 = Instant::now();
        c.put("a", ok("x"), Duration::from_secs(10), t0);
        c.put("b", ok("y"), Duration::from_secs(3600), t0);
        c.put("z", ok("0"), Duration::ZERO, t0);
        assert_eq!(c.get("a", t0 + Duration::from_secs(9)), Some(ok("x")));
        assert_eq!(c.get("a", t0 + Duration::from_secs(10)), None);
        // 3600 s is capped at max_ttl (60 s).
        assert!(c.get("b", t0 + Duration::from_secs(59)).is_some());
        assert!(c.get("b", t0 + Duration::from_secs(60)).is_none());
        // TTL 0 is floored at one second.
        assert!(c.get("z", t0).is_some());
        assert!(c.get("z", t0 + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn negative_cache_is_bounded_and_expires() {
        let mut c = TxtCache::new(&cfg());
        let t0 = Instant::now();
        for i in 0..1000 {
            let name = format!("n{i}");
            c.put(
                &name,
                Err(DnsError::NotFound(name.clone())),
                Duration::ZERO,
                t0,
            );
            assert!(c.len().1 <= 2, "negative cache grew to {}", c.len().1);
        }
        assert_eq!(c.len(), (0, 2));
        assert!(c.get("n999", t0).is_some());
        assert!(c.get("n0", t0).is_none());
        assert!(c.get("n999", t0 + Duration::from_secs(5)).is_none());
        // A flood of failures never pushes out positive answers.
        c.put("good", ok("app:1"), Duration::from_secs(30), t0);
        for i in 0..100 {
            c.put(
                &format!("m{i}"),
                Err(DnsError::NotFound(String::new())),
                Duration::ZERO,
                t0,
            );
        }
        assert_eq!(c.get("good", t0), Some(ok("app:1")));
    }

    #[test]
    fn positive_cache_evicts_the_soonest_expiry_when_full() {
        let mut c = TxtCache::new(&cfg());
        let t0 = Instant::now();
        c.put("long", ok("1"), Duration::from_secs(50), t0);
        c.put("short", ok("2"), Duration::from_secs(5), t0);
        c.put("mid", ok("3"), Duration::from_secs(20), t0);
        c.put("new", ok("4"), Duration::from_secs(30), t0);
        assert_eq!(c.len().0, 3);
        assert!(c.get("short", t0).is_none());
        assert!(c.get("long", t0).is_some());
    }

    #[test]
    fn failure_replaces_a_positive_answer_and_back() {
        let mut c = TxtCache::new(&cfg());
        let t0 = Instant::now();
        c.put("a", ok("x"), Duration::from_secs(30), t0);
        c.put("a", Err(DnsError::NotFound("a".into())), Duration::ZERO, t0);
        assert!(matches!(c.get("a", t0), Some(Err(_))));
        c.put("a", ok("y"), Duration::from_secs(30), t0);
        assert_eq!(c.get("a", t0), Some(ok("y")));
        assert_eq!(c.len(), (1, 0));
    }

    struct Counting {
        calls: AtomicUsize,
        delay: Duration,
        answer: Mutex<Result<(Vec<String>, Duration), DnsError>>,
    }

    #[async_trait::async_trait]
    impl TxtSource for Counting {
        async fn txt(&self, _name: &str) -> Result<(Vec<String>, Duration), DnsError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.answer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    fn counting(delay: Duration) -> Arc<Counting> {
        Arc::new(Counting {
            calls: AtomicUsize::new(0),
            delay,
            answer: Mutex::new(Ok((vec!["web:8080".into()], Duration::from_secs(10)))),
        })
    }

    // Real time, kept short: the crate does not enable tokio's test-util (paused clock). The
    // expiry logic itself is tested above with explicit instants.
    #[tokio::test]
    async fn concurrent_misses_share_one_query_and_hits_need_none() {
        let src = counting(Duration::from_millis(100));
        let r = TxtResolver::with_source(&cfg(), src.clone());
        let (a, b) = tokio::join!(r.lookup("X.example."), r.lookup("x.example"));
        assert_eq!(a, b);
        assert_eq!(src.calls.load(Ordering::SeqCst), 1);
        assert_eq!(r.lookup("x.example").await, ok("web:8080"));
        assert_eq!(src.calls.load(Ordering::SeqCst), 1);
        // A fresh lookup always asks, and refreshes the cache.
        *src.answer.lock().unwrap_or_else(PoisonError::into_inner) =
            Ok((vec!["web:9000".into()], Duration::from_secs(10)));
        assert_eq!(r.lookup_fresh("x.example").await, ok("web:9000"));
        assert_eq!(src.calls.load(Ordering::SeqCst), 2);
        assert_eq!(r.lookup("x.example").await, ok("web:9000"));
        assert_eq!(src.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn slow_nameservers_hit_the_deadline_and_are_negatively_cached() {
        let src = counting(Duration::from_secs(3600));
        let c = DnsConfig {
            timeout_ms: 100,
            attempts: 1,
            ..cfg()
        };
        let r = TxtResolver::with_source(&c, src.clone());
        let started = Instant::now();
        let e = r.lookup("slow.example").await;
        assert!(matches!(e, Err(DnsError::Timeout { .. })), "{e:?}");
        // The deadline (timeout x (attempts + 1) = 200 ms) plus scheduling slack.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        r.lookup("slow.example").await.expect_err("cached failure");
        assert_eq!(src.calls.load(Ordering::SeqCst), 1);
        assert_eq!(r.cache_len(), (0, 1));
    }

    #[test]
    fn a_failed_refresh_keeps_the_answer_until_its_ttl() {
        let mut c = TxtCache::new(&cfg());
        let t0 = Instant::now();
        let t = |s| t0 + Duration::from_secs(s);
        c.put("a", ok("x"), Duration::from_secs(20), t0);
        let timeout = DnsError::Timeout {
            name: "a".into(),
            after: Duration::from_secs(1),
        };
        c.put("a", Err(timeout.clone()), Duration::ZERO, t(16));
        assert_eq!(c.get("a", t(19)), Some(ok("x")));
        assert_eq!(c.get("a", t(20)), None);
        // Without a valid answer to fall back on, the failure is cached.
        c.put("a", Err(timeout), Duration::ZERO, t(21));
        assert!(matches!(
            c.get("a", t(22)),
            Some(Err(DnsError::Timeout { .. }))
        ));
    }

    #[test]
    fn hits_in_the_last_quarter_of_the_ttl_ask_for_a_refresh() {
        let mut c = TxtCache::new(&cfg());
        let t0 = Instant::now();
        c.put("a", ok("x"), Duration::from_secs(20), t0);
        let mut at = |s| c_hit(&mut c, "a", t0 + Duration::from_secs(s));
        assert_eq!(at(14), Some(false));
        assert_eq!(at(15), Some(true));
        assert_eq!(at(19), Some(true));
        assert_eq!(at(20), None);
        c.put("n", Err(DnsError::NotFound("n".into())), Duration::ZERO, t0);
        // Failures are not refreshed ahead: nobody is being served from them.
        assert_eq!(c_hit(&mut c, "n", t0 + Duration::from_secs(4)), Some(false));
    }

    fn c_hit(c: &mut TxtCache, name: &str, now: Instant) -> Option<bool> {
        c.hit(name, now).map(|h| h.refresh)
    }

    #[tokio::test]
    async fn a_hot_name_is_refreshed_before_it_expires() {
        let src = counting(Duration::ZERO);
        *src.answer.lock().unwrap_or_else(PoisonError::into_inner) =
            Ok((vec!["web:1".into()], Duration::from_secs(1)));
        let r = TxtResolver::with_source(&cfg(), src.clone());
        assert_eq!(r.lookup("hot.example").await, ok("web:1"));
        *src.answer.lock().unwrap_or_else(PoisonError::into_inner) =
            Ok((vec!["web:2".into()], Duration::from_secs(1)));
        // Inside the refresh window (after 750 ms) a hit answers from the cache at once and
        // starts one background lookup.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(r.lookup("hot.example").await, ok("web:1"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.cache().get("hot.example", Instant::now()) != Some(ok("web:2")) {
            assert!(Instant::now() < deadline, "refresh never landed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(src.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn config_validation() {
        assert!(DnsConfig::default().validate().is_ok());
        for bad in [
            DnsConfig {
                timeout_ms: 0,
                ..Default::default()
            },
            DnsConfig {
                attempts: 0,
                ..Default::default()
            },
            DnsConfig {
                negative_cache_capacity: 0,
                ..Default::default()
            },
            DnsConfig {
                nameservers: vec!["0.0.0.0:53".parse().expect("addr")],
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
