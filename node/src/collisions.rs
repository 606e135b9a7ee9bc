//! Reports name collisions the applied state already holds.
//!
//! New clashes between instance ids and app routes are refused by the state machine
//! (`raft/src/state/names.rs`), but a state written by an older build may still hold some.
//! The data plane serves the app route in each case (`edge/route.rs`); this tells the operator
//! which instances lost their name, in the log when the set changes (so at start too), as the
//! `portcullis_name_collisions` gauge and in `cluster status`.

use std::sync::Arc;
use std::time::Duration;

use portcullis_raft::state::Collision;
use portcullis_raft::Cluster;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the applied state is looked at again (only when it has changed).
const EVERY: Duration = Duration::from_secs(5);

/// One collision as the operator reads it.
pub fn describe(c: &Collision) -> String {
    format!("{} (app {}): {}", c.instance_id, c.app, c.why)
}

pub fn spawn(
    cluster: Cluster,
    metrics: Arc<crate::metrics::Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    tracker.spawn(async move {
        let mut seen_index = None;
        let mut reported: Vec<String> = Vec::new();
        loop {
            let applied = cluster.metrics().last_applied.map(|l| l.index);
            if applied.is_some() && applied != seen_index {
                seen_index = applied;
                // O(instances) under the state's read lock, at most once per `EVERY`.
                let now: Vec<String> = cluster
                    .shared
                    .read()
                    .state
                    .name_collisions()
                    .iter()
                    .map(describe)
                    .collect();
                metrics
                    .name_collisions
                    .set(i64::try_from(now.len()).unwrap_or(i64::MAX));
                if now != reported {
                    if now.is_empty() {
                        tracing::info!("no name collisions left in the applied state");
                    } else {
                        tracing::warn!(
                            count = now.len(),
                            collisions = ?now,
                            "instance ids clash with app routes or each other; the app route is served (portcullis cvm remove the instances)"
                        );
                    }
                    reported = now;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
        }
    });
}
