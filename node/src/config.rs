//! The node's TOML configuration: documented fields, hand-written defaults, and `validate()` for
//! everything that spans fields. `portcullis check-config FILE` runs exactly this code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field { field, reason: reason.into() }
}

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
        }
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
        AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9080)), token_file: PathBuf::new() }
    }
}

/// Public listeners (the data plane).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// HTTPS listen address. Default `0.0.0.0:443`. Unset with `enabled = false`.
    pub https_listen: SocketAddr,
    /// Plain HTTP listen address (redirects to HTTPS). Default `0.0.0.0:80`.
    pub http_listen: SocketAddr,
    /// Serve the data plane at all. Default true.
    pub enabled: bool,
    /// Base domains under which `<app>.<base>` routes. Default empty.
    pub base_domains: Vec<String>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            https_listen: SocketAddr::from(([0, 0, 0, 0], 443)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 80)),
            enabled: true,
            base_domains: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// Reads, parses and validates `path`. Relative paths inside the file are resolved against
    /// the file's directory, so a config and its keys can move together.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut cfg: NodeConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.data_dir,
            &mut cfg.cluster.ca_cert,
            &mut cfg.cluster.cert,
            &mut cfg.cluster.key,
            &mut cfg.admin.token_file,
        ] {
            if !p.as_os_str().is_empty() && p.is_relative() {
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
            || !self.region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("region", format!("{:?}: use 1-63 letters, digits, '-' or '_'", self.region)));
        }
        if !(-90.0..=90.0).contains(&self.latitude) {
            return Err(bad("latitude", format!("{} is outside -90..=90", self.latitude)));
        }
        if !(-180.0..=180.0).contains(&self.longitude) {
            return Err(bad("longitude", format!("{} is outside -180..=180", self.longitude)));
        }
        let c = &self.cluster;
        for (field, p) in [("cluster.ca_cert", &c.ca_cert), ("cluster.cert", &c.cert), ("cluster.key", &c.key)] {
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
                format!("{} must be at least 3 x heartbeat_ms ({})", c.election_timeout_min_ms, c.heartbeat_ms),
            ));
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(bad(
                "cluster.election_timeout_max_ms",
                format!("{} must exceed election_timeout_min_ms ({})", c.election_timeout_max_ms, c.election_timeout_min_ms),
            ));
        }
        if c.snapshot_every == 0 {
            return Err(bad("cluster.snapshot_every", "must be > 0"));
        }
        if self.admin.token_file.as_os_str().is_empty() {
            return Err(bad("admin.token_file", "is required: the admin API refuses to run without a bearer token"));
        }
        for d in &self.edge.base_domains {
            let ok = d.contains('.')
                && d.split('.').all(|l| {
                    !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                });
            if !ok {
                return Err(bad("edge.base_domains", format!("{d:?} is not a lowercase DNS name")));
            }
        }
        if self.edge.enabled && self.edge.https_listen == self.edge.http_listen {
            return Err(bad("edge.http_listen", "must differ from edge.https_listen"));
        }
        Ok(())
    }

    pub fn advertise_addr(&self) -> String {
        self.cluster.advertise.clone().unwrap_or_else(|| self.cluster.listen.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NodeConfig {
        let mut c = NodeConfig { node_id: 1, region: "us-east".into(), ..Default::default() };
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
        let cases: Vec<(&str, Box<dyn Fn(&mut NodeConfig)>)> = vec![
            ("node_id", Box::new(|c| c.node_id = 0)),
            ("region", Box::new(|c| c.region = "bad region".into())),
            ("admin.token_file", Box::new(|c| c.admin.token_file = PathBuf::new())),
            ("cluster.election_timeout_min_ms", Box::new(|c| c.cluster.election_timeout_min_ms = 10)),
            ("cluster.election_timeout_max_ms", Box::new(|c| c.cluster.election_timeout_max_ms = 1)),
            ("latitude", Box::new(|c| c.latitude = 91.0)),
            ("edge.base_domains", Box::new(|c| c.edge.base_domains = vec!["Not Valid".into()])),
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
