//! The orderer: every node runs it; only the holder of the replicated lease talks to the CA.
//!
//! One pass (as lease holder): work out which names need a certificate (missing, not covering
//! the name, a third of the lifetime left, corrupt, or `cert renew` requested), and for each that
//! is not backing off: load or create the account (kept in the replicated state), resume the
//! order a previous holder left (if the CA still has it pending or ready) or place a new one,
//! publish each HTTP-01 answer through Raft, tell the CA to validate, wait, finalize with a fresh
//! key and write the certificate. Every write carries the lease's fencing token; the state
//! machine rejects it if the lease has since moved, so a holder that stalled cannot overwrite its
//! successor.
//!
//! A renewer task extends the lease every third of its lifetime. If renewal fails long enough
//! that the lease may have expired, or the log says someone else holds it, the pass in flight is
//! dropped at its next await point.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, ChallengeStatus,
    ChallengeType, Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use portcullis_raft::state::{
    AcmeAccount, AcmeChallenge, AcmeCommand, AcmeOrder, Certificate, ChallengeKind, ClusterState,
    Command, OrdererLease,
};
use portcullis_raft::{Cluster, Response};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{in_zone, ChallengeChoice};
use super::dns01::{Dns01Client, Dns01Error};
use super::{unix_now, unix_now_ms, AcmeConfig, AcmeMetrics};
use crate::secrets::Keyring;

/// First retry delay after a failed order; doubles up to `retry_max_secs`.
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest wait for a published HTTP-01 / TLS-ALPN-01 answer to be applied on every voter before
/// the CA is told to validate (the CA may reach any node). Past it, the CA is asked anyway: a
/// node that is down cannot be reached by the CA either, and a failed validation is retried.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to give up the lease on shutdown, so the next node need not wait for expiry.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("timed out after {0:?} waiting for the CA")]
    Timeout(Duration),
    #[error("cluster write failed: {0}")]
    Cluster(#[from] portcullis_raft::ClusterError),
    #[error("cluster rejected the write: {0}")]
    Rejected(String),
    #[error("stored ACME account is unreadable: {0}")]
    Credentials(#[from] serde_json::Error),
    #[error("the CA offered no {kind} challenge for {name}")]
    NoChallenge { name: String, kind: &'static str },
    #[error("unsupported identifier {0} in an authorization")]
    Identifier(String),
    #[error("DNS-01: {0}")]
    Dns01(#[from] Dns01Error),
    #[error("authorization for {name} is {status:?}")]
    Authorization {
        name: String,
        status: AuthorizationStatus,
    },
    #[error("order for {name} became {status:?}: {detail}")]
    OrderFailed {
        name: String,
        status: OrderStatus,
        detail: String,
    },
    #[error("CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("the CA returned an unusable certificate: {0}")]
    BadCertificate(String),
    #[error("lost the orderer lease")]
    LeaseLost,
    #[error("private key at rest: {0}")]
    Secrets(#[from] crate::secrets::SecretsError),
}

/// An answer published for one authorization, to be withdrawn when the order is decided.
struct Published {
    token: String,
    /// The validated name (no `*.`).
    name: String,
    /// The DNS-01 TXT value, when a record was added.
    txt: Option<String>,
}

/// Per-name retry state (memory only: a new holder starts fresh, which at worst costs one early
/// retry per name).
struct Backoff {
    failures: u32,
    next: Instant,
}

/// Runs the orderer on this node until `shutdown`. Also keeps the expiry metrics current on every
/// node, with or without ACME enabled.
pub fn spawn(
    cfg: AcmeConfig,
    base_domains: Vec<String>,
    cluster: Cluster,
    metrics: Arc<AcmeMetrics>,
    keyring: Arc<Keyring>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    let shared = cluster.shared.clone();
    let m = metrics.clone();
    let sd = shutdown.clone();
    tracker.spawn(async move {
        let mut changes = shared.subscribe();
        loop {
            m.sync_certificates(&shared.read().state);
            tokio::select! {
                _ = sd.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
        }
    });
    if !cfg.enabled {
        return;
    }
    let orderer = Orderer {
        lease_ttl: Duration::from_secs(cfg.lease_secs),
        cfg,
        base_domains,
        cluster,
        metrics,
        keyring,
        account: None,
        backoff: HashMap::new(),
        renew_seen: HashMap::new(),
        warned: HashSet::new(),
    };
    tracker.spawn(orderer.run(shutdown));
}

struct Orderer {
    cfg: AcmeConfig,
    base_domains: Vec<String>,
    cluster: Cluster,
    metrics: Arc<AcmeMetrics>,
    /// Seals the account and certificate keys before they enter Raft; opens the account.
    keyring: Arc<Keyring>,
    lease_ttl: Duration,
    /// The account built from the stored credentials (which are the cache key).
    account: Option<(String, Account)>,
    backoff: HashMap<String, Backoff>,
    /// The `cert renew` request time last acted on per name: a new request skips the backoff once.
    renew_seen: HashMap<String, u64>,
    /// Names already warned about (wildcards), so the log is not flooded every pass.
    warned: HashSet<String>,
}

impl Orderer {
    async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(directory = %self.cfg.directory, "ACME orderer started");
        loop {
            if let Some(lease) = self.try_acquire().await {
                self.hold(lease, &shutdown).await;
            }
            if shutdown.is_cancelled() {
                return;
            }
            // Non-holders check back a little faster than the lease renews, so a dead holder
            // is replaced soon after its lease expires.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.lease_ttl / 4) => {}
            }
        }
    }

    fn node_id(&self) -> u64 {
        self.cluster.id
    }

    /// Proposes `AcquireLease` unless the local state shows a live lease held by another node.
    async fn try_acquire(&self) -> Option<OrdererLease> {
        let now_ms = unix_now_ms();
        let current = self.cluster.shared.read().state.acme.holder_at(now_ms);
        if current.is_some_and(|l| l.holder != self.node_id()) {
            return None;
        }
        match self.acquire(now_ms).await {
            Ok(l) if l.holder == self.node_id() => Some(l),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "orderer lease not acquired");
                None
            }
        }
    }

    async fn acquire(&self, now_ms: u64) -> Result<OrdererLease, AcmeError> {
        let ttl_ms = u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let (_, resp) = self
            .cluster
            .write(Command::Acme(AcmeCommand::AcquireLease {
                node: self.node_id(),
                now_ms,
                ttl_ms,
            }))
            .await?;
        match resp {
            Response::Lease(l) => Ok(l),
            Response::Rejected(m) => Err(AcmeError::Rejected(m)),
            other => Err(AcmeError::Rejected(format!("unexpected answer {other:?}"))),
        }
    }

    /// Works as the orderer until the lease is lost or the node shuts down.
    async fn hold(&mut self, lease: OrdererLease, shutdown: &CancellationToken) {
        let fencing = lease.fencing;
        tracing::info!(fencing, "holding the ACME orderer lease");
        self.metrics.lease_held.set(1);
        self.metrics
            .lease_fencing
            .set(i64::try_from(fencing).unwrap_or(i64::MAX));
        let lost = CancellationToken::new();
        let renewer = {
            let cluster = self.cluster.clone();
            let lost = lost.clone();
            let ttl = self.lease_ttl;
            let node = self.node_id();
            tokio::spawn(renew_lease(cluster, node, fencing, ttl, lost))
        };
        let mut changes = self.cluster.shared.subscribe();
        loop {
            let wake = tokio::select! {
                _ = lost.cancelled() => break,
                _ = shutdown.cancelled() => break,
                wake = self.pass(fencing, &lost) => wake,
            };
            tokio::select! {
                _ = lost.cancelled() => break,
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
                r = changes.changed() => if r.is_err() { break },
            }
        }
        lost.cancel();
        renewer.abort();
        self.metrics.lease_held.set(0);
        if shutdown.is_cancelled() {
            let release = self.cluster.write(Command::Acme(AcmeCommand::ReleaseLease {
                node: self.node_id(),
                fencing,
            }));
            match timeout(RELEASE_TIMEOUT, release).await {
                Ok(Ok(_)) => tracing::info!(fencing, "released the ACME orderer lease"),
                Ok(Err(e)) => tracing::warn!(error = %e, "releasing the orderer lease"),
                Err(_) => tracing::warn!("releasing the orderer lease timed out"),
            }
        } else {
            tracing::warn!(fencing, "lost the ACME orderer lease");
        }
    }

    /// Names this cluster should hold certificates for, and which of them are due now.
    fn due_names(&mut self, state: &ClusterState, now: u64) -> Vec<String> {
        let mut wanted: BTreeSet<String> = self.cfg.domains.iter().cloned().collect();
        if self.cfg.include_base_domains {
            wanted.extend(self.base_domains.iter().cloned());
        }
        wanted.extend(
            state
                .domains
                .values()
                .filter(|d| d.verified && !d.passthrough)
                .map(|d| d.name.clone()),
        );
        // `cert renew NAME` applies to any stored certificate, configured or not.
        wanted.extend(
            state
                .acme
                .renew_requests
                .keys()
                .filter(|n| state.certificates.contains_key(*n))
                .cloned(),
        );
        let mut due = Vec::new();
        for name in wanted {
            if self.uses_dns01(&name) {
                let skip = match &self.cfg.dns01 {
                    None => Some("wildcard certificates need DNS-01: configure [acme.dns01], or import one with `portcullis cert import`"),
                    Some(d) if !in_zone(&name, &d.zone) => Some("name is outside acme.dns01.zone; DNS-01 cannot validate it"),
                    Some(_) => None,
                };
                if let Some(why) = skip {
                    if self.warned.insert(name.clone()) {
                        tracing::warn!(%name, why, "certificate not ordered");
                    }
                    continue;
                }
            }
            let renew_requested = state.acme.renew_requests.get(&name).copied();
            let reason = match state.certificates.get(&name) {
                None => Some("no certificate"),
                Some(_) if renew_requested.is_some() => Some("renewal requested"),
                Some(c) => renewal_reason(c, &name, now),
            };
            let Some(reason) = reason else { continue };
            if let Some(at) = renew_requested {
                if self.renew_seen.insert(name.clone(), at) != Some(at) {
                    self.backoff.remove(&name);
                }
            }
            if self
                .backoff
                .get(&name)
                .is_some_and(|b| b.next > Instant::now())
            {
                continue;
            }
            tracing::info!(%name, reason, "certificate due");
            due.push(name);
        }
        due
    }

    /// One round of work. Returns when to look again if nothing changes.
    async fn pass(&mut self, fencing: u64, lost: &CancellationToken) -> Instant {
        self.sweep(fencing).await;
        // Decided under a short read guard (no await inside), without copying the state.
        let due = {
            let shared = self.cluster.shared.clone();
            let applied = shared.read();
            self.due_names(&applied.state, unix_now())
        };
        for name in due {
            let overall = Duration::from_secs(self.cfg.request_timeout_secs.saturating_mul(5));
            let result = match timeout(overall, self.order(&name, fencing)).await {
                Ok(r) => r,
                Err(_) => Err(AcmeError::Timeout(overall)),
            };
            match result {
                Ok(not_after) => {
                    self.backoff.remove(&name);
                    self.metrics
                        .orders
                        .get_or_create(&super::metrics::ResultLabels { result: "issued" })
                        .inc();
                    tracing::info!(%name, not_after, fencing, "certificate issued and stored");
                }
                Err(e) => {
                    self.metrics
                        .orders
                        .get_or_create(&super::metrics::ResultLabels { result: "failed" })
                        .inc();
                    if matches!(&e, AcmeError::Rejected(m) if m.starts_with("stale orderer")) {
                        lost.cancel();
                    }
                    let b = self.backoff.entry(name.clone()).or_insert(Backoff {
                        failures: 0,
                        next: Instant::now(),
                    });
                    b.failures = b.failures.saturating_add(1);
                    let delay = retry_delay(b.failures, self.cfg.retry_max_secs);
                    b.next = Instant::now() + delay;
                    tracing::warn!(%name, error = %e, retry_in = ?delay, failures = b.failures, "ACME order failed; the current certificate (if any) keeps serving");
                }
            }
            if lost.is_cancelled() {
                break;
            }
        }
        let check = Instant::now() + Duration::from_secs(self.cfg.check_interval_secs);
        self.backoff
            .values()
            .map(|b| b.next)
            .min()
            .map_or(check, |next| next.min(check))
            .max(Instant::now() + Duration::from_millis(100))
    }

    /// Whether `name` is validated with DNS-01: wildcards always are (RFC 8555 §7.1.3 allows
    /// nothing else), other names when `challenge = "dns-01"`.
    fn uses_dns01(&self, name: &str) -> bool {
        name.starts_with("*.") || self.cfg.challenge == ChallengeChoice::Dns01
    }

    async fn write(&self, cmd: AcmeCommand) -> Result<u64, AcmeError> {
        let (index, resp) = self.cluster.write(Command::Acme(cmd)).await?;
        match resp {
            Response::Rejected(m) => Err(AcmeError::Rejected(m)),
            _ => Ok(index),
        }
    }

    fn builder(&self) -> Result<AccountBuilder, AcmeError> {
        Ok(match &self.cfg.extra_root {
            Some(root) => Account::builder_with_root(root)?,
            None => Account::builder()?,
        })
    }

    /// Bounds one call to the CA: instant-acme's client has no timeouts of its own.
    async fn ca<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, instant_acme::Error>>,
    ) -> Result<T, AcmeError> {
        let limit = Duration::from_secs(self.cfg.request_timeout_secs);
        match timeout(limit, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(AcmeError::Timeout(limit)),
        }
    }

    /// The cluster's account for the configured directory, created once and stored in Raft.
    async fn account(&mut self, fencing: u64) -> Result<Account, AcmeError> {
        let stored = self.cluster.shared.read().state.acme.account.clone();
        if let Some(a) = stored.filter(|a| a.directory == self.cfg.directory) {
            if let Some((creds, acc)) = &self.account {
                if *creds == a.credentials {
                    return Ok(acc.clone());
                }
            }
            let sealed = super::decode_sealed(&a.encryption, &a.credentials);
            let json = self.keyring.open(
                &a.encryption,
                &crate::secrets::account_aad(&a.directory),
                &sealed,
            )?;
            let creds: AccountCredentials = serde_json::from_slice(&json)?;
            let acc = self.ca(self.builder()?.from_credentials(creds)).await?;
            self.account = Some((a.credentials, acc.clone()));
            return Ok(acc);
        }
        let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
        let new = NewAccount {
            contact: &contact,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (acc, creds) = self
            .ca(self
                .builder()?
                .create(&new, self.cfg.directory.clone(), None))
            .await?;
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&creds)?);
        let (sealed, encryption) = self
            .keyring
            .seal(&crate::secrets::account_aad(&self.cfg.directory), &json)?;
        let credentials = super::encode_sealed(&sealed);
        self.write(AcmeCommand::PutAccount {
            fencing,
            account: AcmeAccount {
                directory: self.cfg.directory.clone(),
                credentials: credentials.clone(),
                encryption,
            },
        })
        .await?;
        tracing::info!(account = acc.id(), directory = %self.cfg.directory, "created ACME account");
        self.account = Some((credentials, acc.clone()));
        Ok(acc)
    }

    /// Orders (or resumes ordering) a certificate for `name` and stores it. Returns its expiry.
    async fn order(&mut self, name: &str, fencing: u64) -> Result<u64, AcmeError> {
        let account = self.account(fencing).await?;
        let previous = self
            .cluster
            .shared
            .read()
            .state
            .acme
            .orders
            .get(name)
            .cloned();
        let mut resumed = None;
        if let Some(p) = previous {
            match self.ca(account.order(p.url.clone())).await {
                // Only orders still waiting for validation or finalization can be resumed: a
                // processing or valid order's key died with the previous holder.
                Ok(mut o) => {
                    let status = o.state().status;
                    if matches!(status, OrderStatus::Pending | OrderStatus::Ready) {
                        tracing::info!(%name, url = %p.url, "resuming the previous holder's order");
                        resumed = Some(o);
                    } else {
                        tracing::info!(%name, url = %p.url, ?status, "previous order cannot be resumed; ordering again");
                    }
                }
                Err(e) => {
                    tracing::info!(%name, url = %p.url, error = %e, "previous order unavailable; ordering again")
                }
            }
        }
        let mut order = match resumed {
            Some(o) => o,
            None => {
                let ids = [Identifier::Dns(name.to_string())];
                let o = self.ca(account.new_order(&NewOrder::new(&ids))).await?;
                self.write(AcmeCommand::PutOrder {
                    fencing,
                    order: AcmeOrder {
                        name: name.to_string(),
                        names: vec![name.to_string()],
                        url: o.url().to_string(),
                        started_at: unix_now(),
                    },
                })
                .await?;
                o
            }
        };
        let mut published = Vec::new();
        let result = self
            .complete(&mut order, name, fencing, &mut published)
            .await;
        for p in published {
            // DNS records first: the table entry is what lets a later holder find a record
            // that could not be removed now.
            if let Some(txt) = &p.txt {
                match self.dns01_client() {
                    Ok(dns) => {
                        if let Err(e) = dns.remove_txt(&p.name, txt).await {
                            tracing::warn!(name = %p.name, error = %e, "removing the DNS-01 TXT record failed; a later pass retries once the answer is stale");
                            continue;
                        }
                        tracing::info!(name = %p.name, "dns-01 TXT record removed");
                    }
                    Err(e) => tracing::warn!(error = %e, "removing the DNS-01 TXT record"),
                }
            }
            // Answers are useless once the CA has decided; a failure here only leaves a stale
            // entry that the next successful cleanup or order replaces.
            if let Err(e) = self
                .write(AcmeCommand::RemoveChallenge {
                    fencing,
                    token: p.token,
                })
                .await
            {
                tracing::debug!(error = %e, "removing a challenge answer");
            }
        }
        result
    }

    /// Withdraws answers that no order can still be using: older than the longest an order may
    /// take. They are left behind by a holder that died mid-order or whose cleanup failed; for
    /// DNS-01 that includes the TXT record in the zone. Younger ones may belong to an order the
    /// previous holder left for this one to resume, whose validation may be in flight.
    async fn sweep(&self, fencing: u64) {
        let max_age = self.cfg.request_timeout_secs.saturating_mul(5);
        let stale = {
            let applied = self.cluster.shared.read();
            stale_challenges(&applied.state, unix_now(), max_age)
        };
        for c in stale {
            if c.kind == ChallengeKind::Dns01 {
                let removed = match self.dns01_client() {
                    Ok(dns) => dns
                        .remove_txt(&c.name, &dns01_txt_value(&c.key_authorization))
                        .await
                        .map_err(AcmeError::from),
                    Err(e) => Err(e),
                };
                if let Err(e) = removed {
                    // Kept in the table so the next pass tries again.
                    tracing::warn!(name = %c.name, error = %e, "removing a stale DNS-01 TXT record failed");
                    continue;
                }
                tracing::info!(name = %c.name, "stale dns-01 TXT record removed");
            }
            let token = c.token;
            if let Err(e) = self
                .write(AcmeCommand::RemoveChallenge { fencing, token })
                .await
            {
                tracing::debug!(error = %e, "removing a stale challenge answer");
            }
        }
    }

    /// A DNS-01 client for the configured server, with the TSIG secret read now (so a rotated
    /// key file is picked up without a restart).
    fn dns01_client(&self) -> Result<Dns01Client, AcmeError> {
        let cfg = self.cfg.dns01.as_ref().ok_or(Dns01Error::NotConfigured)?;
        Ok(Dns01Client::from_config(
            cfg,
            Duration::from_secs(self.cfg.request_timeout_secs),
        )?)
    }

    async fn complete(
        &self,
        order: &mut Order,
        name: &str,
        fencing: u64,
        published: &mut Vec<Published>,
    ) -> Result<u64, AcmeError> {
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(500))
            .backoff(1.5)
            .timeout(Duration::from_secs(self.cfg.request_timeout_secs));
        if order.state().status == OrderStatus::Pending {
            let limit = Duration::from_secs(self.cfg.request_timeout_secs);
            let mut auths = order.authorizations();
            loop {
                let next = match timeout(limit, auths.next()).await {
                    Ok(Some(a)) => a?,
                    Ok(None) => break,
                    Err(_) => return Err(AcmeError::Timeout(limit)),
                };
                let mut authz = next;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    status => {
                        return Err(AcmeError::Authorization {
                            name: authz.identifier().to_string(),
                            status,
                        })
                    }
                }
                let ident = authz.identifier();
                // The authorization names the plain name; a wildcard order says so in a flag.
                let (wildcard, ident) = match ident.identifier {
                    Identifier::Dns(d) => (ident.wildcard, d.clone()),
                    _ => return Err(AcmeError::Identifier(ident.to_string())),
                };
                let kind = if wildcard || self.cfg.challenge == ChallengeChoice::Dns01 {
                    ChallengeKind::Dns01
                } else if self.cfg.challenge == ChallengeChoice::TlsAlpn01 {
                    ChallengeKind::TlsAlpn01
                } else {
                    ChallengeKind::Http01
                };
                let ctype = match kind {
                    ChallengeKind::Http01 => ChallengeType::Http01,
                    ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
                    ChallengeKind::Dns01 => ChallengeType::Dns01,
                };
                let mut challenge =
                    authz
                        .challenge(ctype)
                        .ok_or_else(|| AcmeError::NoChallenge {
                            name: ident.clone(),
                            kind: kind.as_str(),
                        })?;
                let key_authorization = challenge.key_authorization();
                let txt = (kind == ChallengeKind::Dns01).then(|| key_authorization.dns_value());
                let key_authorization = key_authorization.as_str().to_string();
                let token = challenge.token.clone();
                let index = self
                    .write(AcmeCommand::PutTypedChallenge {
                        fencing,
                        challenge: AcmeChallenge {
                            token: token.clone(),
                            name: ident.clone(),
                            key_authorization,
                            created_at: unix_now(),
                            kind,
                        },
                    })
                    .await?;
                published.push(Published {
                    token,
                    name: ident.clone(),
                    txt: txt.clone(),
                });
                match &txt {
                    // Only this node (the lease holder) talks to the DNS server; the TXT record
                    // must be answered by the authoritative server before the CA looks.
                    Some(txt) => {
                        let dns = self.dns01_client()?;
                        dns.add_txt(&ident, txt).await?;
                        dns.wait_visible(&ident, txt).await?;
                        tracing::info!(name = %ident, "dns-01 TXT record added and visible at the authoritative server");
                    }
                    None => {
                        let started = Instant::now();
                        let lagging = self
                            .cluster
                            .wait_applied_on_voters(index, PROPAGATION_TIMEOUT)
                            .await;
                        let waited_ms = started.elapsed().as_millis();
                        if lagging.is_empty() {
                            tracing::info!(name = %ident, index, waited_ms, "answer applied on every voter");
                        } else {
                            tracing::warn!(name = %ident, index, ?lagging, waited_ms, "answer not applied on every voter in time; asking the CA anyway");
                        }
                    }
                }
                let method = kind.as_str();
                // A resumed order's challenge may already be validating (the previous holder
                // asked); the answer stays published for it, and asking again is refused by CAs.
                if challenge.status != ChallengeStatus::Pending {
                    tracing::info!(name = %ident, status = ?challenge.status, method, "answer republished; the CA is already validating");
                    continue;
                }
                tracing::info!(name = %ident, method, "{method} answer published; asking the CA to validate");
                match timeout(limit, challenge.set_ready()).await {
                    Ok(r) => r?,
                    Err(_) => return Err(AcmeError::Timeout(limit)),
                }
            }
            let status = self.ca(order.poll_ready(&retry)).await?;
            if status != OrderStatus::Ready {
                let detail = self.failure_detail(order).await;
                return Err(AcmeError::OrderFailed {
                    name: name.to_string(),
                    status,
                    detail,
                });
            }
        }
        // A fresh key for every certificate; it never leaves this node except through Raft.
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        self.ca(order.finalize_csr(csr.der())).await?;
        let chain_pem = self.ca(order.poll_certificate(&retry)).await?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        let meta = crate::tls::inspect(name, &chain_pem, key_pem.as_bytes())
            .map_err(|e| AcmeError::BadCertificate(e.to_string()))?;
        let not_after = meta.not_after;
        let (sealed_key, key_encryption) = self
            .keyring
            .seal(&crate::secrets::cert_aad(name), key_pem.as_bytes())?;
        self.write(AcmeCommand::PutCertificate {
            fencing,
            cert: Certificate {
                name: name.to_string(),
                names: meta.names,
                chain_pem,
                key: sealed_key,
                key_encryption,
                not_after,
                issuer: meta.issuer,
            },
        })
        .await?;
        Ok(not_after)
    }

    /// The CA's reasons for a failed order, from its authorizations' challenges.
    async fn failure_detail(&self, order: &mut Order) -> String {
        if let Some(e) = &order.state().error {
            return e.to_string();
        }
        let mut reasons = Vec::new();
        let mut auths = order.authorizations();
        while let Ok(Some(Ok(mut a))) = timeout(
            Duration::from_secs(self.cfg.request_timeout_secs),
            auths.next(),
        )
        .await
        {
            let ident = a.identifier().to_string();
            if let Ok(state) = a.refresh().await {
                for c in &state.challenges {
                    if let Some(p) = &c.error {
                        reasons.push(format!("{ident}: {p}"));
                    }
                }
            }
        }
        if reasons.is_empty() {
            "the CA gave no reason".into()
        } else {
            reasons.join("; ")
        }
    }
}

/// Keeps the lease alive every third of its lifetime. Cancels `lost` when the log says another
/// node holds it, or when renewals have failed for so long that it may have expired.
async fn renew_lease(
    cluster: Cluster,
    node: u64,
    fencing: u64,
    ttl: Duration,
    lost: CancellationToken,
) {
    let mut last_ok = Instant::now();
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let started = Instant::now();
        let write = cluster.write(Command::Acme(AcmeCommand::AcquireLease {
            node,
            now_ms: unix_now_ms(),
            ttl_ms,
        }));
        match timeout(ttl / 3, write).await {
            Ok(Ok((_, Response::Lease(l)))) if l.holder == node && l.fencing == fencing => {
                last_ok = started;
            }
            Ok(Ok((_, resp))) => {
                tracing::warn!(?resp, "orderer lease taken over");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the orderer lease"),
            Err(_) => tracing::warn!("renewing the orderer lease timed out"),
        }
        // Stop before the lease can have expired in the log: another node may take it then.
        if last_ok.elapsed() >= ttl.saturating_sub(ttl / 3) {
            tracing::warn!("orderer lease renewals failing; stepping down");
            lost.cancel();
            return;
        }
    }
}

/// Published answers created more than `max_age` seconds before `now`.
fn stale_challenges(state: &ClusterState, now: u64, max_age: u64) -> Vec<AcmeChallenge> {
    let cutoff = now.saturating_sub(max_age);
    state
        .acme
        .challenges
        .values()
        .filter(|c| c.created_at < cutoff)
        .cloned()
        .collect()
}

/// The DNS-01 TXT value for a key authorization (RFC 8555 §8.4): base64url(SHA-256), unpadded;
/// the same as instant-acme's `KeyAuthorization::dns_value`, recomputed here from the stored
/// string because a sweeping holder has no `KeyAuthorization` object.
fn dns01_txt_value(key_authorization: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

fn retry_delay(failures: u32, max_secs: u64) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    let d = RETRY_MIN.saturating_mul(1u32 << shift);
    d.min(Duration::from_secs(max_secs))
}

/// Why a stored certificate needs replacing now, if it does. A certificate that cannot be parsed
/// is replaced (and said so); one that can keeps serving until a third of its life remains.
fn renewal_reason(c: &Certificate, name: &str, now: u64) -> Option<&'static str> {
    if !c.names.iter().any(|n| n == name) {
        return Some("stored certificate does not cover the name");
    }
    let Some((not_before, not_after)) = validity(&c.chain_pem) else {
        tracing::warn!(%name, "stored certificate cannot be parsed; ordering a replacement");
        return Some("stored certificate is corrupt");
    };
    let lifetime = not_after.saturating_sub(not_before);
    let remaining = not_after.saturating_sub(now);
    (remaining.saturating_mul(3) <= lifetime).then_some("a third of its lifetime remains")
}

/// The leaf's validity period in unix seconds.
fn validity(chain_pem: &str) -> Option<(u64, u64)> {
    let mut r = chain_pem.as_bytes();
    let der = rustls_pemfile::certs(&mut r).next()?.ok()?;
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let v = x509.validity();
    Some((
        u64::try_from(v.not_before.timestamp()).ok()?,
        u64::try_from(v.not_after.timestamp()).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(name: &str, days: u64) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        let now = rcgen::date_time_ymd(2026, 1, 1);
        p.not_before = now;
        p.not_after = now + std::time::Duration::from_secs(days * 86400);
        let cert = p.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn renewal_at_a_third_of_the_lifetime() {
        let (pem, _) = self_signed("a.example.com", 90);
        let (nb, na) = validity(&pem).expect("parses");
        assert_eq!(na - nb, 90 * 86400);
        let c = Certificate {
            name: "a.example.com".into(),
            names: vec!["a.example.com".into()],
            chain_pem: pem,
            ..Default::default()
        };
        assert_eq!(renewal_reason(&c, "a.example.com", nb + 59 * 86400), None);
        assert!(renewal_reason(&c, "a.example.com", nb + 60 * 86400).is_some());
        assert!(renewal_reason(&c, "b.example.com", nb).is_some());
        let corrupt = Certificate {
            chain_pem: "garbage".into(),
            ..c
        };
        assert_eq!(
            renewal_reason(&corrupt, "a.example.com", nb),
            Some("stored certificate is corrupt")
        );
    }

    #[test]
    fn only_old_answers_are_swept() {
        let mut state = ClusterState::default();
        for (token, created_at) in [("old", 100u64), ("young", 950)] {
            state.acme.challenges.insert(
                token.into(),
                AcmeChallenge {
                    token: token.into(),
                    name: "example.com".into(),
                    key_authorization: format!("{token}.thumb"),
                    created_at,
                    kind: ChallengeKind::Dns01,
                },
            );
        }
        let stale = stale_challenges(&state, 1000, 300);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].token, "old");
        assert!(stale_challenges(&state, 10, 300).is_empty(), "no underflow");
    }

    #[test]
    fn dns01_value_is_unpadded_base64url_sha256() {
        // sha256("") = e3b0c442...; base64url without padding.
        assert_eq!(
            dns01_txt_value(""),
            "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(retry_delay(1, 3600), Duration::from_secs(5));
        assert_eq!(retry_delay(2, 3600), Duration::from_secs(10));
        assert_eq!(retry_delay(4, 3600), Duration::from_secs(40));
        assert_eq!(retry_delay(100, 3600), Duration::from_secs(3600));
        assert_eq!(retry_delay(3, 7), Duration::from_secs(7));
    }
}
