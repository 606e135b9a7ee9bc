//! The web application firewall: the OWASP Core Rule Set on libmodsecurity, per-app policy from
//! the replicated state (`portcullis_raft::state::WafPolicy`), run on every protocol's requests
//! in `edge/proxy/forward.rs` once the route is known and before a backend is chosen.
//!
//! Files:
//! - the `portcullis-modsec` crate: libmodsecurity's C API, opened at run time (the node runs
//!   without it; apps then cannot have the WAF on, and their policy's fail mode applies).
//! - `seclang.rs`: the rule set text of one policy (engine settings, CRS setup, the policy's
//!   paranoia and thresholds, the operator's extra files, CRS rules, exclusions).
//! - `verdict.rs`: matched rules and the anomaly score from the engine's messages.
//! - `gate.rs`: the request path — body buffering up to the inspected size, the evaluation on
//!   the bounded pool within the budget, the response phases, the 403.
//! - `body.rs`: a body that replays the inspected prefix, then streams the rest.
//! - `policies.rs`: each app's effective policy, as the routing snapshot carries it.
//! - `probe.rs`: `portcullis waf test`, one raw request through the engine.
//! - `audit.rs`: the JSON audit log, written off the request path.
//! - `metrics.rs`: `portcullis_waf_*`.
//!
//! This file owns the compiled rule sets. One rule set per distinct policy (apps with equal
//! policies share one), compiled off the request path when the routing snapshot changes
//! ([`Waf::prepare`]) and swapped as a whole on [`Waf::reload`]: a rule set that fails to load
//! leaves the serving ones in place and says why.
//!
//! Rule evaluation is CPU-bound C code that cannot be interrupted. It runs on tokio's blocking
//! threads, at most `waf.max_concurrent` at once, so the event loops keep serving other
//! connections; a request whose evaluation outruns its budget follows its policy (`on_budget`)
//! while the evaluation finishes in the background and holds its slot.

pub mod audit;
mod body;
pub mod gate;
pub mod metrics;
mod policies;
pub mod probe;
pub mod seclang;
pub mod verdict;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use portcullis_raft::state::{WafMode, WafPolicy};

use portcullis_modsec::{Library, RuleSet};
use seclang::RuleFiles;

pub use metrics::WafMetrics;
pub use policies::Policies;

/// The node's WAF settings (`[waf]`), resolved to paths.
#[derive(Debug, Clone)]
pub struct WafSettings {
    /// `None`: no rules configured; apps with the WAF on get their fail mode.
    pub files: Option<RuleFiles>,
    /// libmodsecurity's path; the system's when unset.
    pub library: Option<String>,
    pub audit_log: PathBuf,
    /// Log every inspected request, not only those that matched.
    pub audit_all: bool,
    /// Evaluations running at once.
    pub max_concurrent: usize,
    pub node_id: u64,
}

/// Compiled rule sets kept for policies no app uses right now (a few tens of MiB each).
const MAX_IDLE_SETS: usize = 4;

/// Compiled rule sets by policy. The mode is part of the key (detect compiles without
/// disruptive actions).
type Sets = HashMap<WafPolicy, Arc<RuleSet>>;

pub struct Waf {
    lib: Result<Arc<Library>, String>,
    settings: WafSettings,
    /// Rule file paths of the current generation, read at the last (re)load.
    rule_paths: Mutex<Result<Vec<PathBuf>, String>>,
    sets: ArcSwap<Sets>,
    /// Serialises compiles and reloads (never held on the request path).
    compiling: Mutex<()>,
    pool: Arc<tokio::sync::Semaphore>,
    pub(crate) audit: Option<audit::AuditLog>,
    pub(crate) metrics: Arc<WafMetrics>,
    next_id: AtomicU64,
    /// A per-process prefix of request ids, so ids stay unique across restarts.
    boot: u64,
}

impl Waf {
    /// Opens the library and reads the rule directory; compiles nothing yet. Never fails: what
    /// is missing is logged and makes protected apps follow their fail mode.
    pub fn new(settings: WafSettings, metrics: Arc<WafMetrics>) -> Arc<Waf> {
        let lib = match &settings.files {
            None => Err("no rules configured (waf.crs_dir)".to_string()),
            Some(_) => Library::open(settings.library.as_deref()),
        };
        match &lib {
            Ok(l) => tracing::info!(engine = %l.version(), "WAF engine loaded"),
            Err(e) if settings.files.is_some() => {
                tracing::error!(error = %e, "WAF engine unavailable: apps with the WAF on follow their fail mode")
            }
            Err(_) => {}
        }
        let rule_paths = match &settings.files {
            Some(f) => f.rule_paths(),
            None => Err("no rules configured".into()),
        };
        let audit = match audit::AuditLog::open(&settings.audit_log, metrics.audit_dropped.clone())
        {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(path = %settings.audit_log.display(), error = %e, "WAF audit log not opened");
                None
            }
        };
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Arc::new(Waf {
            lib,
            pool: Arc::new(tokio::sync::Semaphore::new(settings.max_concurrent.max(1))),
            settings,
            rule_paths: Mutex::new(rule_paths),
            sets: ArcSwap::from_pointee(HashMap::new()),
            compiling: Mutex::new(()),
            audit,
            metrics,
            next_id: AtomicU64::new(1),
            boot,
        })
    }

    /// A new request id: node, process start, sequence. Unique in the cluster without
    /// coordination, and sortable per node.
    pub fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{:x}-{n:x}", self.settings.node_id, self.boot)
    }

    pub fn audit_all(&self) -> bool {
        self.settings.audit_all
    }

    pub fn node_id(&self) -> u64 {
        self.settings.node_id
    }

    /// The rule file path prefixes the engine's messages may name (for `verdict::parse_line`).
    pub(crate) fn rule_prefixes(&self) -> Vec<String> {
        let Some(f) = &self.settings.files else {
            return Vec::new();
        };
        let mut v = vec![f.rules.display().to_string()];
        v.extend(f.extra.iter().map(|p| p.display().to_string()));
        v.push(f.setup.display().to_string());
        v
    }

    /// Why no rules can run, if so.
    pub fn unavailable(&self) -> Option<String> {
        match (
            &self.lib,
            &*self.rule_paths.lock().unwrap_or_else(|p| p.into_inner()),
        ) {
            (Err(e), _) | (_, Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// The engine's name and version, or why there is none.
    pub fn engine_version(&self) -> String {
        match &self.lib {
            Ok(l) => l.version(),
            Err(e) => format!("unavailable: {e}"),
        }
    }

    /// Compiles `policy`'s rule set for a one-off use (not kept). Blocking.
    pub(crate) fn compile_now(&self, policy: &WafPolicy) -> Result<RuleSet, String> {
        let lib = self.lib.as_ref().map_err(|e| e.clone())?;
        let paths = self
            .rule_paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        self.compile(lib, policy, &paths)
    }

    /// The compiled rule set of `policy`, if prepared.
    pub fn rule_set(&self, policy: &WafPolicy) -> Option<Arc<RuleSet>> {
        self.sets.load().get(policy).cloned()
    }

    fn compile(
        &self,
        lib: &Arc<Library>,
        policy: &WafPolicy,
        paths: &[PathBuf],
    ) -> Result<RuleSet, String> {
        let files = self
            .settings
            .files
            .as_ref()
            .ok_or_else(|| "no rules configured".to_string())?;
        let started = std::time::Instant::now();
        let set = lib.compile(&seclang::render(policy, files, paths))?;
        tracing::info!(
            mode = policy.mode.as_str(),
            paranoia = policy.paranoia,
            ms = started.elapsed().as_millis() as u64,
            "WAF rule set compiled"
        );
        Ok(set)
    }

    /// Compiles the rule sets of `policies` that are not compiled yet, and drops those no
    /// policy uses any more. Blocking (hundreds of milliseconds per new policy): call it off
    /// the event loops. A policy that fails to compile is logged; its apps follow their fail
    /// mode.
    pub fn prepare<'a>(&self, policies: impl IntoIterator<Item = &'a WafPolicy>) {
        let Ok(lib) = &self.lib else { return };
        let _g = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
        let paths = match &*self.rule_paths.lock().unwrap_or_else(|p| p.into_inner()) {
            Ok(p) => p.clone(),
            Err(_) => return,
        };
        let current = self.sets.load_full();
        let mut next: Sets = HashMap::new();
        let policies: Vec<&WafPolicy> = policies.into_iter().collect();
        for p in policies.into_iter().filter(|p| p.mode != WafMode::Off) {
            if next.contains_key(p) {
                continue;
            }
            let set = match current.get(p) {
                Some(s) => s.clone(),
                None => match self.compile(lib, p, &paths) {
                    Ok(s) => {
                        self.metrics
                            .reloads
                            .get_or_create(&metrics::ResultLabels { result: "ok" })
                            .inc();
                        Arc::new(s)
                    }
                    Err(e) => {
                        self.metrics
                            .reloads
                            .get_or_create(&metrics::ResultLabels { result: "error" })
                            .inc();
                        tracing::error!(error = %e, "WAF rule set failed to load");
                        continue;
                    }
                },
            };
            next.insert(p.clone(), set);
        }
        // Sets no policy uses any more are kept a while: switching an app back (detect, then
        // block again) must not wait for a compile.
        let in_use = next.len();
        for (p, set) in current.iter() {
            if next.len() >= in_use + MAX_IDLE_SETS {
                break;
            }
            next.entry(p.clone()).or_insert_with(|| set.clone());
        }
        self.sets.store(Arc::new(next));
    }

    /// Reads the rule directory again and recompiles every serving policy. All or nothing: if
    /// any fails, the serving rule sets stay and the error is returned. Blocking.
    pub fn reload(&self) -> Result<usize, String> {
        let lib = self.lib.as_ref().map_err(|e| e.clone())?;
        let files = self
            .settings
            .files
            .as_ref()
            .ok_or_else(|| "no rules configured (waf.crs_dir)".to_string())?;
        let _g = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
        let fail = |e: String| {
            self.metrics
                .reloads
                .get_or_create(&metrics::ResultLabels { result: "error" })
                .inc();
            tracing::error!(error = %e, "WAF rule reload failed; the previous rules keep serving");
            e
        };
        let paths = files.rule_paths().map_err(fail)?;
        let current = self.sets.load_full();
        let mut next: Sets = HashMap::new();
        for p in current.keys() {
            let set = self.compile(lib, p, &paths).map_err(fail)?;
            next.insert(p.clone(), Arc::new(set));
        }
        let n = next.len();
        *self.rule_paths.lock().unwrap_or_else(|p| p.into_inner()) = Ok(paths);
        self.sets.store(Arc::new(next));
        self.metrics
            .reloads
            .get_or_create(&metrics::ResultLabels { result: "ok" })
            .inc();
        tracing::info!(rule_sets = n, "WAF rules reloaded");
        Ok(n)
    }

    /// A slot on the evaluation pool.
    pub(crate) async fn slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        // The semaphore is never closed.
        self.pool
            .clone()
            .acquire_owned()
            .await
            .expect("WAF pool semaphore is never closed")
    }
}
