//! The replicated state (`ClusterState`), the typed commands that change it, and `apply`.
//!
//! Two rules shape this module:
//! - `Command::validate` runs before a command is proposed, so malformed input never enters the
//!   log. `ClusterState::apply` checks again against the current state (an app may have been
//!   created by a concurrent write) and answers with `Response::Rejected` instead of failing.
//! - `apply` is deterministic and never panics: no clocks, no randomness, no hash-map iteration
//!   order, no arithmetic that can overflow. Anything time-like (registration time) travels inside
//!   the command, stamped by the proposer.
//!
//! This module owns what the cluster agrees on and every way it may change. It imports std,
//! serde, thiserror and `portcullis_geo` (the load-balancing policy grammar; the tests also use
//! bincode and proptest), and nothing else of this crate: the store, the batcher and `Cluster`
//! build on it, never the other way round. Other crates use it through the names this file
//! re-exports.
//!
//! Files, bottom up; each imports only files listed before it, and `acme.rs` also this one:
//! - `validate.rs`: `ValidationError` and the field checks (names, ports, policies, coordinates).
//! - `nesting.rs`: the depth bound on decoding nested batches.
//! - `pool.rs`: `TunnelPool`, the CVM tunnel address range and its allocation.
//! - `acme.rs`: ACME account, challenges, orders and the orderer lease, all in one place: its
//!   state (held in `ClusterState`), commands, validation and apply. So it is the one file that
//!   takes names from this file (`ClusterState`, `Certificate`, `Response`, `Command`).
//! - `waf.rs`: WAF policies (`WafPolicy`, `WafState`), their types and field checks.
//! - `model.rs`: `ClusterState` and the records it holds (nodes, regions, apps, instances,
//!   domains, certificates, registers).
//! - `names.rs`: one namespace for routable names; `Registration`, and the checks of app names
//!   and instance ids against the state.
//! - `legacy.rs`: shapes written by earlier builds, frozen so old log entries and snapshots
//!   decode.
//! - `command.rs`: `Command` and `Response`, `Command::validate`, and
//!   `ClusterState::check_registration`.
//! - `apply.rs`: `ClusterState::apply`.
//! - `tests.rs`, `names/tests.rs`: property and unit tests.

mod acme;
mod apply;
mod command;
mod legacy;
mod model;
mod names;
mod nesting;
mod pool;
mod validate;
mod waf;

pub use acme::{
    AcmeAccount, AcmeChallenge, AcmeCommand, AcmeOrder, AcmeState, ChallengeKind, Http01Challenge,
    OrdererLease, MAX_ACME_CHALLENGES, MAX_LEASE_TTL_MS,
};
pub use command::{
    Command, Response, Rewrap, RewrapTarget, StaleInstance, MAX_EXPIRE_BATCH, MAX_REWRAP_BATCH,
};
pub use legacy::{ClusterStateV1, ClusterStateV2, InstanceV1, TunnelPoolV1};
pub use model::{
    App, Certificate, ClusterState, Domain, GatewayNode, Instance, NodeStatus, Region, Register,
    MAX_INSTANCE_WEIGHT,
};
pub use names::{port_form, Collision, Registration, RegistrationPolicy};
pub use nesting::MAX_BATCH_DEPTH;
pub use pool::{TunnelPool, GATEWAY_TUNNEL_V4, GATEWAY_TUNNEL_V6};
pub use validate::{
    validate_app_name, validate_lb, validate_ports, ValidationError, MAX_APP_PORTS, MAX_CERT_BYTES,
};
pub use waf::{
    FailMode, OverLimit, RuleExclusion, WafMode, WafPolicy, WafState, MAX_WAF_BODY_LIMIT,
    MAX_WAF_BUDGET_MS, MAX_WAF_EXCLUSIONS,
};

#[cfg(test)]
pub(crate) mod tests;
