//! Backend choice for the data plane: one geo [`Selector`](portcullis_geo::Selector) per app, instance health, and the
//! client's location.
//!
//! [`Balancer`] is long-lived (one per edge). On every routing-table rebuild it compiles an
//! immutable [`Balance`] that goes into the snapshot next to the routes, so the request path
//! reads selectors and health without a lock. What must survive rebuilds — one
//! [`LoadCounter`](portcullis_geo::LoadCounter) and one [`InstanceHealth`] per instance id — lives in the balancer's maps,
//! which only the rebuild touches. A rebuild after a change ([`Balancer::update`]) rebuilds
//! only the selectors of the apps whose instances, weights or policy changed and shares the
//! others with the previous [`Balance`].
//!
//! Health is local soft state (never written through Raft): every node probes every instance
//! itself (TCP connect or HTTP GET; rise/fall thresholds), and the proxy ejects an instance
//! after `passive_fall` consecutive connect failures seen by real requests.
//!
//! Layout: `balancer.rs` ([`Balancer`], [`Balance`], [`candidates`]), `health.rs` (the
//! `[health]` section, [`InstanceHealth`], the prober), `geo.rs` (the `[geo]` section, the
//! client-location database and its reload).

mod balancer;
mod geo;
mod health;

pub use balancer::{
    candidates, effective_client, hash_key, input, Balance, BalanceError, Balancer, Candidate,
    NoCandidate,
};
pub(crate) use balancer::{weight_of, weights_of};
pub use geo::{geo_reload_loop, GeoConfig};
pub use health::{probe, probe_loop, HealthConfig, InstanceHealth};
