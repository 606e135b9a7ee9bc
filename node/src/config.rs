//! The node's TOML configuration: documented fields, hand-written defaults, and `validate()` for
//! everything that spans fields. `portcullis check-config FILE` runs exactly this code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod error;

use error::bad;
pub use error::ConfigError;

/// One gateway node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's Raft id: unique in the cluster, never reused, not 0. Required.
    pub node_id: u64,
    /// Region this node serves, e.g. `us-east`. Required.
    pub region: String,
    /// Where the Raft log, vote and snapshots live. Default `./data`.
    pub data_dir: PathBuf,
    /// Where this node is on the map (degrees); used for geographic balancing. Default 0, 0.
    pub latitude: f64,
    pub longitude: f64,
    pub cluster: ClusterConfig,
    pub admin: AdminConfig,
    pub edge: EdgeConfig,
    /// `[geo]`: the client-location database (docs/load-balancing.md).
    pub geo: crate::edge::balance::GeoConfig,
    /// `[health]`: active probes and passive ejection of instances.
    pub health: crate::edge::balance::HealthConfig,
    pub wg: WgConfig,
    /// Automatic certificates (docs/certificates.md). Disabled by default.
    pub acme: crate::acme::AcmeConfig,
    /// `[dns]`: TXT lookups for custom domains (docs/custom-domains.md).
    pub dns: crate::edge::dns::DnsConfig,
    /// `[secrets]`: the cluster data key that seals private keys at rest (docs/keys-at-rest.md).
    pub secrets: crate::secrets::SecretsConfig,
    /// `[waf]`: the rules the web application firewall runs (docs/waf.md). Per-app policy is in
    /// the replicated state.
    pub waf: WafConfig,
    /// Test-only switches that deliberately break guarantees, so the chaos harness can prove it
    /// catches the breakage (docs/chaos.md). Never set these in production.
    pub debug: DebugConfig,
}

/// `[waf]`: where this node's WAF rules come from. Without `crs_dir` no rules run, and apps whose
/// policy turns the WAF on follow their fail mode (`on_budget`), counted in
/// `portcullis_waf_unavailable_total`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WafConfig {
    /// An OWASP CRS release directory: `crs-setup.conf` (or `crs-setup.conf.example`) and
    /// `rules/*.conf`.
    pub crs_dir: Option<PathBuf>,
    /// SecLang files included after the CRS setup and the policy's settings, before the rules
    /// (site-wide settings, exclusions).
    pub extra_conf: Vec<PathBuf>,
    /// libmodsecurity 3's shared library; default: the system's `libmodsecurity.so.3`.
    pub library: Option<String>,
    /// The JSON audit log (relative to `data_dir`). Default `waf-audit.jsonl`.
    pub audit_log: PathBuf,
    /// Log every inspected request, not only those that matched a rule.
    pub audit_all: bool,
    /// Rule evaluations running at once (blocking threads). Default: the number of CPUs.
    pub max_concurrent: usize,
}

impl Default for WafConfig {
    fn default() -> Self {
        WafConfig {
            crs_dir: None,
            extra_conf: Vec::new(),
            library: None,
            audit_log: PathBuf::from("waf-audit.jsonl"),
            audit_all: false,
            max_concurrent: 0,
        }
    }
}

impl WafConfig {
    /// Evaluations at once: the configured number, else one per CPU.
    pub fn concurrency(&self) -> usize {
        if self.max_concurrent > 0 {
            self.max_concurrent
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }

    /// The audit log's path, under `data_dir` unless absolute.
    pub fn audit_path(&self, data_dir: &Path) -> PathBuf {
        if self.audit_log.is_absolute() {
            self.audit_log.clone()
        } else {
            data_dir.join(&self.audit_log)
        }
    }
}

/// Test-only fault switches (`[debug]`). All default to off.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DebugConfig {
    /// TEST ONLY: `KvGet` answers from local state without the linearizable barrier, so a
    /// partitioned node serves stale reads. Exists so `portcullis-chaos` can show its checker
    /// flags a stale read (cluster-tests/scenarios/broken-stale-reads.toml).
    pub unsafe_stale_reads: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 0,
            region: String::new(),
            data_dir: PathBuf::from("data"),
            latitude: 0.0,
            longitude: 0.0,
            cluster: ClusterConfig::default(),
            admin: AdminConfig::default(),
            edge: EdgeConfig::default(),
            geo: Default::default(),
            health: Default::default(),
            wg: WgConfig::default(),
            acme: crate::acme::AcmeConfig::default(),
            dns: crate::edge::dns::DnsConfig::default(),
            secrets: Default::default(),
            waf: WafConfig::default(),
            debug: DebugConfig::default(),
        }
    }
}

/// The WireGuard port that carries every tunnel to CVMs (see docs/wireguard.md). The key pair
/// lives in `<data_dir>/wg.key` (mode 0600), created on first start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WgConfig {
    /// Run the gateway side of the tunnels at all. Default true.
    pub enabled: bool,
    /// UDP listen address. Default `0.0.0.0:51820`.
    pub listen: SocketAddr,
    /// `host:port` CVMs send to. Default: `listen`, or, when `listen` is a wildcard address,
    /// the host of `cluster.advertise` with the port of `listen`.
    pub advertise: Option<String>,
    /// Inner MTU in bytes. Default 1420 (as wg-quick); lower it on paths with a smaller MTU.
    pub mtu: usize,
    /// A CVM registration not renewed for this many seconds expires: the instance leaves the
    /// routing table and its tunnel address returns to the pool. `cvm-agent` renews every
    /// `reregister_secs` (30 by default). 0 keeps registrations until `cvm remove`. Default
    /// 86400. Only the leader expires, with the value in its own configuration.
    pub expire_after_secs: u64,
    /// Most instances one app may register with CVM credentials, so that one tenant cannot
    /// drain the cluster-wide tunnel address pool. A renewal is never refused by it; operators
    /// (`cvm register` on the admin API) are not held to it. 0 is no limit. Default 1024.
    pub max_instances_per_app: u32,
    /// Registrations per second one app may make through this node with CVM credentials
    /// (each is a Raft write; renewals answered from a fresh stamp are free). Default 10.
    pub registration_rate_per_app: f64,
    /// Burst of registrations one app may make at once above that rate. Default 64.
    pub registration_burst_per_app: u32,
}

impl Default for WgConfig {
    fn default() -> Self {
        WgConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 51820)),
            advertise: None,
            mtu: 1420,
            expire_after_secs: 86_400,
            max_instances_per_app: 1024,
            registration_rate_per_app: 10.0,
            registration_burst_per_app: 64,
        }
    }
}

impl WgConfig {
    fn validate(&self, node_id: u64) -> Result<(), ConfigError> {
        // The registry serves CVMs whether or not this node terminates tunnels.
        if !(self.registration_rate_per_app.is_finite() && self.registration_rate_per_app > 0.0) {
            return Err(bad(
                "wg.registration_rate_per_app",
                format!(
                    "{} must be a positive number of registrations per second",
                    self.registration_rate_per_app
                ),
            ));
        }
        if self.registration_burst_per_app == 0 {
            return Err(bad("wg.registration_burst_per_app", "must be at least 1"));
        }
        if !self.enabled {
            return Ok(());
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(bad(
                "wg.mtu",
                format!("{} must be within 576..=9000", self.mtu),
            ));
        }
        if crate::tunnel::addr::gateway_tunnel_ip(node_id).is_none() {
            return Err(bad(
                "wg.enabled",
                format!(
                    "node_id {node_id} is too large to derive a gateway tunnel address (at most {}); set wg.enabled = false",
                    crate::tunnel::addr::MAX_GATEWAY_ID
                ),
            ));
        }
        if let Some(a) = &self.advertise {
            if crate::edge::route::split_host_port(a).1.is_none() {
                return Err(bad("wg.advertise", format!("{a:?} is not host:port")));
            }
        }
        Ok(())
    }
}

/// The cluster RPC port: Raft and node-to-node calls, mutual TLS with the cluster CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Listen address. Default `0.0.0.0:8000`.
    pub listen: SocketAddr,
    /// Address other nodes use to reach this one. Default: `listen`.
    pub advertise: Option<String>,
    /// Cluster CA certificate (PEM). Required.
    pub ca_cert: PathBuf,
    /// This node's certificate (PEM), issued by the cluster CA for `node-<id>`. Required.
    pub cert: PathBuf,
    /// This node's private key (PEM). Required.
    pub key: PathBuf,
    /// Leader heartbeat interval in milliseconds; about one round trip between the farthest
    /// regions. Default 250.
    pub heartbeat_ms: u64,
    /// Election timeout range in milliseconds; at least ten round trips. Default 1500..3000.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Connect timeout to peers, milliseconds. Default 2000.
    pub connect_timeout_ms: u64,
    /// Take a snapshot (and purge the log before it) after this many applied entries. Default 5000.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot, so a briefly lagging follower catches up from the log
    /// instead of receiving a whole snapshot. Default 1000.
    pub keep_logs_after_snapshot: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            advertise: None,
            ca_cert: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            heartbeat_ms: 250,
            election_timeout_min_ms: 1500,
            election_timeout_max_ms: 3000,
            connect_timeout_ms: 2000,
            snapshot_every: 5000,
            keep_logs_after_snapshot: 1000,
        }
    }
}

/// The admin listener: gRPC admin API, `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address. Default `127.0.0.1:9080`; keep it off public interfaces.
    pub listen: SocketAddr,
    /// File holding the bearer token. Required: the node refuses to start without a token.
    pub token_file: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9080)),
            token_file: PathBuf::new(),
        }
    }
}

/// Public listeners (the data plane). Every timeout is in milliseconds unless its name says
/// otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// HTTPS listen address. Default `0.0.0.0:443`; `[::]:443` accepts IPv4 and IPv6 on Linux.
    pub https_listen: SocketAddr,
    /// Plain HTTP listen address (308 redirect to HTTPS, ACME HTTP-01). Default `0.0.0.0:80`.
    pub http_listen: SocketAddr,
    /// Serve the data plane at all. Default true.
    pub enabled: bool,
    /// Base domains under which `<app>.<base>` routes. Default empty.
    pub base_domains: Vec<String>,
    /// HTTPS port that clients see, used in redirects from the HTTP port (differs from the
    /// listen port behind port mapping). Default: the port of `https_listen`.
    pub https_public_port: Option<u16>,
    /// Largest ClientHello accepted, bytes. At least 16384: post-quantum key shares make
    /// ClientHellos exceed one TLS record. Default 32768.
    pub max_client_hello_bytes: usize,
    /// Time for a new connection to send its PROXY header and whole ClientHello. Default 5000.
    pub client_hello_timeout_ms: u64,
    /// Time for the TLS handshake after the ClientHello. Default 10000.
    pub tls_handshake_timeout_ms: u64,
    /// Time for a client to send a request's headers (slow-header defence). Default 10000.
    pub header_read_timeout_ms: u64,
    /// A connection with no bytes moving in either direction and no request in flight is
    /// closed after this long. Default 60000.
    pub idle_timeout_ms: u64,
    /// Time from receiving a request to the backend's response headers. Default 60000.
    pub request_timeout_ms: u64,
    /// Time to open a connection to a backend. Default 3000.
    pub backend_connect_timeout_ms: u64,
    /// Oldest a client connection may get before it is asked to close (it finishes in-flight
    /// requests first). Default 3600.
    pub max_connection_age_secs: u64,
    /// Most request headers (HTTP/1.1). Default 100.
    pub max_header_count: usize,
    /// Most bytes of request headers. Default 65536.
    pub max_header_bytes: usize,
    /// Largest request body, bytes; larger bodies get 413. Default 104857600 (100 MiB).
    pub max_request_body_bytes: u64,
    /// HTTP/2 concurrent streams per connection. Default 100.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before they were answered, per connection, beyond
    /// which the connection is closed (rapid-reset defence, CVE-2023-44487). Default 50.
    pub h2_max_pending_reset_streams: usize,
    /// Open client connections per node. Default 10000.
    pub max_connections: usize,
    /// Open client connections per client IP. Default 256.
    pub max_connections_per_ip: usize,
    /// CIDRs whose connections may (and may only) start with a PROXY protocol v1/v2 header,
    /// e.g. a load balancer. Default empty.
    pub proxy_protocol_from: Vec<String>,
    /// CIDRs allowed to reach `<cvm-id>.internal`. Default empty (nobody on the public ports).
    pub trusted_networks: Vec<String>,
    /// `Strict-Transport-Security` max-age in seconds; 0 sends no header. Default 31536000.
    pub hsts_max_age_secs: u64,
    /// Idle pooled backend connections are closed after this long. Default 90000.
    pub backend_pool_idle_timeout_ms: u64,
    /// Idle pooled connections kept per backend address. Default 512: at least the number of
    /// requests in flight to one backend, or every burst closes and reopens connections (and
    /// fills the host with TIME_WAIT sockets).
    pub backend_pool_max_idle: usize,
    /// One structured log line per request (target `portcullis::access`). Default true.
    pub access_log: bool,
    /// Serve HTTP/3 (QUIC over UDP) on the port number of `https_listen` and advertise it with
    /// `Alt-Svc` on HTTPS responses. Default true.
    pub http3: bool,
    /// UDP address for HTTP/3 when it must differ from `https_listen`'s. Default: the address
    /// and bound port of `https_listen`.
    pub http3_listen: Option<SocketAddr>,
    /// HTTP/3 request streams one connection may have open at once (QUIC bidirectional
    /// stream credit). Default 100.
    pub http3_max_concurrent_streams: u32,
    /// Longest one HTTP/3 request may take, from its headers to the end of its response body,
    /// seconds; the stream is reset past it. Default 300.
    pub http3_request_total_timeout_secs: u64,
    /// Threads that serve HTTPS connections, each with its own event loop, all accepting from
    /// the one listener (like nginx's `worker_processes`). A connection stays on the thread
    /// that accepted it, together with its backend connections. Default: the number of CPUs.
    /// 0 serves the data plane on the node's shared runtime instead.
    pub workers: Option<usize>,
    /// Pins worker `i` to the `i`-th CPU the node may run on (as nginx's
    /// `worker_cpu_affinity auto` and HAProxy's `cpu-map` do). Default: pin when there are
    /// exactly as many workers as such CPUs, the default `workers`. A worker holds its
    /// connections to the end, so while it waits for a core they all wait: unpinned, on two
    /// cores shared with the load, HTTP/1.1 p99 was up to twice as long (docs/data-plane.md,
    /// "Worker threads").
    pub pin_workers: Option<bool>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            https_listen: SocketAddr::from(([0, 0, 0, 0], 443)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 80)),
            enabled: true,
            base_domains: Vec::new(),
            https_public_port: None,
            max_client_hello_bytes: 32 * 1024,
            client_hello_timeout_ms: 5_000,
            tls_handshake_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 60_000,
            backend_connect_timeout_ms: 3_000,
            max_connection_age_secs: 3_600,
            max_header_count: 100,
            max_header_bytes: 64 * 1024,
            max_request_body_bytes: 100 * 1024 * 1024,
            h2_max_concurrent_streams: 100,
            h2_max_pending_reset_streams: 50,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            proxy_protocol_from: Vec::new(),
            trusted_networks: Vec::new(),
            hsts_max_age_secs: 31_536_000,
            backend_pool_idle_timeout_ms: 90_000,
            backend_pool_max_idle: 512,
            access_log: true,
            http3: true,
            http3_listen: None,
            http3_max_concurrent_streams: 100,
            http3_request_total_timeout_secs: 300,
            workers: None,
            pin_workers: None,
        }
    }
}

impl EdgeConfig {
    /// `workers`, with its default resolved.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for d in &self.base_domains {
            let ok = d.contains('.')
                && d.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                });
            if !ok {
                return Err(bad(
                    "edge.base_domains",
                    format!("{d:?} is not a lowercase DNS name"),
                ));
            }
        }
        if !self.enabled {
            return Ok(());
        }
        if self.workers.is_some_and(|n| n > 1024) {
            return Err(bad(
                "edge.workers",
                "at most 1024 (one per core is the point; 0 uses the shared runtime)",
            ));
        }
        if self.https_listen == self.http_listen {
            return Err(bad(
                "edge.http_listen",
                "must differ from edge.https_listen",
            ));
        }
        if !(16 * 1024..=1024 * 1024).contains(&self.max_client_hello_bytes) {
            return Err(bad(
                "edge.max_client_hello_bytes",
                format!("{} must be within 16384..=1048576 (large post-quantum ClientHellos need 16 KiB)", self.max_client_hello_bytes),
            ));
        }
        for (field, v) in [
            ("edge.client_hello_timeout_ms", self.client_hello_timeout_ms),
            (
                "edge.tls_handshake_timeout_ms",
                self.tls_handshake_timeout_ms,
            ),
            ("edge.header_read_timeout_ms", self.header_read_timeout_ms),
            ("edge.idle_timeout_ms", self.idle_timeout_ms),
            ("edge.request_timeout_ms", self.request_timeout_ms),
            (
                "edge.backend_connect_timeout_ms",
                self.backend_connect_timeout_ms,
            ),
            ("edge.max_connection_age_secs", self.max_connection_age_secs),
            (
                "edge.http3_request_total_timeout_secs",
                self.http3_request_total_timeout_secs,
            ),
            (
                "edge.http3_max_concurrent_streams",
                u64::from(self.http3_max_concurrent_streams),
            ),
            (
                "edge.backend_pool_idle_timeout_ms",
                self.backend_pool_idle_timeout_ms,
            ),
        ] {
            if v == 0 {
                return Err(bad(field, "must be > 0"));
            }
        }
        if self.max_header_count == 0 || self.max_header_bytes < 1024 {
            return Err(bad(
                "edge.max_header_bytes",
                "max_header_count must be > 0 and max_header_bytes at least 1024",
            ));
        }
        if self.h2_max_concurrent_streams == 0 {
            return Err(bad("edge.h2_max_concurrent_streams", "must be > 0"));
        }
        if self.max_connections == 0
            || self.max_connections_per_ip == 0
            || self.max_connections_per_ip > self.max_connections
        {
            return Err(bad(
                "edge.max_connections_per_ip",
                format!(
                    "{} must be within 1..=max_connections ({})",
                    self.max_connections_per_ip, self.max_connections
                ),
            ));
        }
        for (field, list) in [
            ("edge.proxy_protocol_from", &self.proxy_protocol_from),
            ("edge.trusted_networks", &self.trusted_networks),
        ] {
            for c in list {
                parse_cidr(c).map_err(|e| bad(field, format!("{c:?}: {e}")))?;
            }
        }
        Ok(())
    }
}

/// Parses `10.0.0.0/8` or a bare address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(n) = s.parse::<ipnet::IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| "not a CIDR or IP address".to_string())
}

impl NodeConfig {
    /// Reads, parses and validates `path`. Relative paths inside the file are resolved against
    /// the file's directory, so a config and its keys can move together.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.data_dir,
            &mut cfg.cluster.ca_cert,
            &mut cfg.cluster.cert,
            &mut cfg.cluster.key,
            &mut cfg.admin.token_file,
            &mut cfg.secrets.data_key_file,
        ]
        .into_iter()
        .chain(cfg.secrets.previous_data_key_files.iter_mut())
        {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(db) = cfg.geo.database.as_mut().filter(|p| p.is_relative()) {
            *db = base.join(&*db);
        }
        if let Some(p) = cfg.acme.extra_root.as_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for p in cfg
            .waf
            .crs_dir
            .iter_mut()
            .chain(cfg.waf.extra_conf.iter_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(bad("node_id", "must be set to a non-zero integer"));
        }
        if self.region.is_empty()
            || self.region.len() > 63
            || !self
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                "region",
                format!("{:?}: use 1-63 letters, digits, '-' or '_'", self.region),
            ));
        }
        if !(-90.0..=90.0).contains(&self.latitude) {
            return Err(bad(
                "latitude",
                format!("{} is outside -90..=90", self.latitude),
            ));
        }
        if !(-180.0..=180.0).contains(&self.longitude) {
            return Err(bad(
                "longitude",
                format!("{} is outside -180..=180", self.longitude),
            ));
        }
        let c = &self.cluster;
        for (field, p) in [
            ("cluster.ca_cert", &c.ca_cert),
            ("cluster.cert", &c.cert),
            ("cluster.key", &c.key),
        ] {
            if p.as_os_str().is_empty() {
                return Err(bad(field, "is required (mutual TLS on the cluster port)"));
            }
        }
        if c.heartbeat_ms == 0 {
            return Err(bad("cluster.heartbeat_ms", "must be > 0"));
        }
        if c.election_timeout_min_ms < 3 * c.heartbeat_ms {
            return Err(bad(
                "cluster.election_timeout_min_ms",
                format!(
                    "{} must be at least 3 x heartbeat_ms ({})",
                    c.election_timeout_min_ms, c.heartbeat_ms
                ),
            ));
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(bad(
                "cluster.election_timeout_max_ms",
                format!(
                    "{} must exceed election_timeout_min_ms ({})",
                    c.election_timeout_max_ms, c.election_timeout_min_ms
                ),
            ));
        }
        if c.snapshot_every == 0 {
            return Err(bad("cluster.snapshot_every", "must be > 0"));
        }
        if self.admin.token_file.as_os_str().is_empty() {
            return Err(bad(
                "admin.token_file",
                "is required: the admin API refuses to run without a bearer token",
            ));
        }
        self.edge.validate()?;
        self.health.validate().map_err(|e| bad("health", e))?;
        self.wg.validate(self.node_id)?;
        self.acme.validate()?;
        self.dns.validate()?;
        Ok(())
    }

    pub fn advertise_addr(&self) -> String {
        self.cluster
            .advertise
            .clone()
            .unwrap_or_else(|| self.cluster.listen.to_string())
    }

    /// The WireGuard endpoint published for CVMs (`wg.advertise` and its default).
    pub fn wg_advertise_addr(&self) -> String {
        if let Some(a) = &self.wg.advertise {
            return a.clone();
        }
        let port = self.wg.listen.port();
        if !self.wg.listen.ip().is_unspecified() {
            return self.wg.listen.to_string();
        }
        let advertised = self.advertise_addr();
        match crate::edge::route::split_host_port(&advertised).0 {
            host if !host.is_empty() && host != "0.0.0.0" && host != "::" => {
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            }
            _ => self.wg.listen.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NodeConfig {
        let mut c = NodeConfig {
            node_id: 1,
            region: "us-east".into(),
            ..Default::default()
        };
        c.cluster.ca_cert = "ca.pem".into();
        c.cluster.cert = "node.pem".into();
        c.cluster.key = "node.key".into();
        c.admin.token_file = "token".into();
        c
    }

    #[test]
    fn valid_config_passes() {
        valid().validate().expect("valid");
    }

    #[test]
    fn errors_name_the_field() {
        type Mutation = Box<dyn Fn(&mut NodeConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("node_id", Box::new(|c| c.node_id = 0)),
            ("region", Box::new(|c| c.region = "bad region".into())),
            (
                "admin.token_file",
                Box::new(|c| c.admin.token_file = PathBuf::new()),
            ),
            (
                "cluster.election_timeout_min_ms",
                Box::new(|c| c.cluster.election_timeout_min_ms = 10),
            ),
            (
                "cluster.election_timeout_max_ms",
                Box::new(|c| c.cluster.election_timeout_max_ms = 1),
            ),
            ("latitude", Box::new(|c| c.latitude = 91.0)),
            (
                "wg.registration_rate_per_app",
                Box::new(|c| c.wg.registration_rate_per_app = f64::NAN),
            ),
            (
                "wg.registration_burst_per_app",
                Box::new(|c| c.wg.registration_burst_per_app = 0),
            ),
            (
                "edge.base_domains",
                Box::new(|c| c.edge.base_domains = vec!["Not Valid".into()]),
            ),
            (
                "edge.max_client_hello_bytes",
                Box::new(|c| c.edge.max_client_hello_bytes = 4096),
            ),
            (
                "edge.proxy_protocol_from",
                Box::new(|c| c.edge.proxy_protocol_from = vec!["10.0.0.0/33".into()]),
            ),
            (
                "edge.max_connections_per_ip",
                Box::new(|c| c.edge.max_connections_per_ip = 0),
            ),
            (
                "edge.idle_timeout_ms",
                Box::new(|c| c.edge.idle_timeout_ms = 0),
            ),
            ("wg.mtu", Box::new(|c| c.wg.mtu = 100)),
            ("wg.enabled", Box::new(|c| c.node_id = u64::MAX)),
            (
                "wg.advertise",
                Box::new(|c| c.wg.advertise = Some("nohost".into())),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = valid();
            mutate(&mut c);
            let err = c.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<NodeConfig>("node_id = 1\nregoin = \"x\"\n").expect_err("typo");
        assert!(err.to_string().contains("regoin"), "{err}");
    }
}
