//! Client location: the `[geo]` section, the database it names (or the bundled one), and the
//! reload of a configured database when its file changes.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portcullis_geo::{GeoDb, GeoDbError, Location, ReloadingGeoDb};
use serde::{Deserialize, Serialize};

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

/// Where client locations come from.
pub(super) enum GeoSource {
    Bundled(GeoDb),
    File(Arc<ReloadingGeoDb>),
}

impl GeoSource {
    /// The configured database (reloaded when its file changes), else the bundled one.
    pub(super) fn open(geo: &GeoConfig) -> Result<GeoSource, GeoDbError> {
        Ok(match &geo.database {
            Some(path) => GeoSource::File(Arc::new(ReloadingGeoDb::open(
                path.clone(),
                Duration::from_secs(geo.reload_interval_secs.max(1)),
            )?)),
            None => GeoSource::Bundled(GeoDb::from_bytes(
                BUNDLED_DB.to_vec(),
                "<bundled dbip-country.mmdb>",
            )?),
        })
    }

    /// The reloading database, when one is configured.
    pub(super) fn reloading(&self) -> Option<Arc<ReloadingGeoDb>> {
        match self {
            GeoSource::File(db) => Some(db.clone()),
            GeoSource::Bundled(_) => None,
        }
    }

    /// Where `ip` probably is. Lock-free.
    pub(super) fn locate(&self, ip: IpAddr) -> Option<Location> {
        match self {
            GeoSource::Bundled(db) => db.lookup(ip),
            GeoSource::File(db) => db.lookup(ip),
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

#[cfg(test)]
mod tests {
    use super::super::{Balancer, HealthConfig};
    use super::*;

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
}
