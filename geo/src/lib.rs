//! Portcullis geography and load balancing: where a client is, which region is nearest, and
//! which backend instance gets the connection.
//!
//! The data plane opens a [`ReloadingGeoDb`] at startup, builds one [`Selector`] per app from
//! the app's [`LbPolicy`] whenever routes change, and per connection calls
//! [`Selector::iter`] with the client's [`Location`], taking the first usable backend.
//!
//! Layout:
//! - [`lookup`]: MaxMind-format database reading (City and flat country schemas), country
//!   centroids, and hot reload on file change.
//! - [`region`]: regions, great-circle distance, nearest-first ranking (the failover order).
//! - [`select`]: backend selection — weighted round robin, least connections, Maglev
//!   consistent hashing with bounded load, geographic — and the policy grammar.
//! - `centroids`: the ISO 3166-1 country-centroid table.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod centroids;
pub mod lookup;
pub mod region;
pub mod select;

pub use lookup::{GeoDb, GeoDbError, Location, Precision, ReloadOutcome, ReloadingGeoDb};
pub use region::{haversine_km, rank_regions, Region, RegionError};
pub use select::{
    cookie_value, Backend, BackendSelection, HashKey, LbPolicy, LoadCounter, LoadGuard,
    PolicyParseError, SelectConfig, SelectError, SelectInput, Selector,
};

/// The country-centroid lookup used for country-only databases: `(latitude, longitude)` of
/// the approximate centre of an ISO 3166-1 alpha-2 code (upper case).
pub fn country_centroid(code: &str) -> Option<(f64, f64)> {
    centroids::centroid(code)
}
