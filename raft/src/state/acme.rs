//! Replicated ACME state: the CA account, HTTP-01 challenge answers, pending orders, renewal
//! requests, and the orderer lease with its fencing token.
//!
//! Exactly one node (the lease holder) talks to the CA. The lease is granted through the log, so
//! every node agrees on who holds it; each new grant increments `fencing`, and every write the
//! orderer makes carries the token it was granted. `apply` rejects a write whose token is not the
//! current one, so a holder that stalled (GC pause, partition) and lost its lease cannot overwrite
//! what the new holder wrote, whatever its clock says.
//!
//! Time: `apply` never reads a clock. Lease expiry is compared against `now_ms` stamped by the
//! proposer. Clock skew between nodes can only make a lease be taken over early or late; it can
//! never let two holders both write, because writes are fenced by token, not by time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::validate::{field, validate_domain_name, ValidationError};
use super::{Certificate, ClusterState, Response};

/// Most challenge answers kept at once; an orderer cleans up after each order, so this only
/// bounds what a misbehaving proposer can pile up.
pub const MAX_ACME_CHALLENGES: usize = 1024;
/// Most pending orders and renewal requests kept at once.
pub const MAX_ACME_PENDING: usize = 4096;
/// Longest directory URL, order URL or contact accepted.
const MAX_URL_LEN: usize = 2048;
/// Longest serialized account credentials (a PKCS#8 key plus URLs).
const MAX_CREDENTIALS_LEN: usize = 16 * 1024;
/// Longest lease the log accepts: a holder must come back regularly to prove it is alive.
pub const MAX_LEASE_TTL_MS: u64 = 10 * 60 * 1000;

/// The ACME account the cluster orders with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AcmeAccount {
    /// The directory URL the account belongs to; a config change to another CA creates a new
    /// account instead of using this one.
    pub directory: String,
    /// `instant_acme::AccountCredentials` as JSON (holds the account's private key).
    pub credentials: String,
    /// How `credentials` is protected at rest: `none` until the cluster data key exists.
    pub encryption: String,
}

/// Which ACME validation method a published answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ChallengeKind {
    /// RFC 8555 §8.3: any node serves the key authorization on port 80.
    #[default]
    Http01,
    /// RFC 8737: any node answers a ClientHello offering only `acme-tls/1` for `name` with a
    /// self-signed certificate carrying the key authorization's digest.
    TlsAlpn01,
    /// RFC 8555 §8.4: the orderer puts a TXT record in DNS. Nodes serve nothing; the entry lets
    /// a later lease holder find (and remove) records a dead holder left behind.
    Dns01,
}

impl ChallengeKind {
    /// The RFC name of the method, as CAs and the config spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Dns01 => "dns-01",
        }
    }
}

/// One published answer. For HTTP-01, any node serves `key_authorization` at
/// `http://<name>/.well-known/acme-challenge/<token>`; for TLS-ALPN-01 any node answers an
/// `acme-tls/1` handshake for `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AcmeChallenge {
    pub token: String,
    /// The identifier being validated (the Host or SNI the CA will send; for DNS-01 the name
    /// under `_acme-challenge.`, without any `*.`).
    pub name: String,
    pub key_authorization: String,
    /// Unix seconds, stamped by the proposer (lets an orderer sweep abandoned answers).
    pub created_at: u64,
    /// Appended last. `serde(default)` covers self-describing encodings (JSON dumps); the log
    /// uses bincode, which cannot skip missing fields, so log entries from before this field
    /// existed use [`Http01Challenge`] instead (see [`AcmeCommand::PutChallenge`]).
    #[serde(default)]
    pub kind: ChallengeKind,
}

/// The shape `AcmeCommand::PutChallenge` has always had in the log (HTTP-01 only). Kept
/// unchanged so that entries written by earlier builds still decode: bincode is positional, and
/// adding a field to this struct would make every old `PutChallenge` entry unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Http01Challenge {
    pub token: String,
    pub name: String,
    pub key_authorization: String,
    pub created_at: u64,
}

impl From<&Http01Challenge> for AcmeChallenge {
    fn from(c: &Http01Challenge) -> Self {
        AcmeChallenge {
            token: c.token.clone(),
            name: c.name.clone(),
            key_authorization: c.key_authorization.clone(),
            created_at: c.created_at,
            kind: ChallengeKind::Http01,
        }
    }
}

/// An order in flight, so a new lease holder can resume it instead of starting over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AcmeOrder {
    /// Primary certificate name.
    pub name: String,
    pub names: Vec<String>,
    pub url: String,
    /// Unix seconds, stamped by the proposer.
    pub started_at: u64,
}

/// Who may talk to the CA right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OrdererLease {
    pub holder: u64,
    /// Incremented on every grant to a new holder (or after expiry); never reused.
    pub fencing: u64,
    /// Unix milliseconds, from the clock of the node that acquired or renewed the lease.
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AcmeState {
    pub account: Option<AcmeAccount>,
    /// token → answer.
    pub challenges: BTreeMap<String, AcmeChallenge>,
    /// certificate name → order in flight.
    pub orders: BTreeMap<String, AcmeOrder>,
    /// certificate name → unix seconds of `portcullis cert renew NAME`; cleared when a new
    /// certificate for that name is written.
    pub renew_requests: BTreeMap<String, u64>,
    pub lease: Option<OrdererLease>,
    /// The last fencing token handed out (kept when the lease is released, so tokens only grow).
    pub last_fencing: u64,
}

impl AcmeState {
    fn put_challenge(&mut self, challenge: AcmeChallenge) -> Response {
        if self.challenges.len() >= MAX_ACME_CHALLENGES
            && !self.challenges.contains_key(&challenge.token)
        {
            return Response::Rejected("too many pending ACME challenges".into());
        }
        self.challenges.insert(challenge.token.clone(), challenge);
        Response::Ok
    }

    /// The pending answer of `kind` for `name`, if any (a short scan: the table holds at most
    /// [`MAX_ACME_CHALLENGES`] entries and is usually empty).
    pub fn challenge_for(&self, kind: ChallengeKind, name: &str) -> Option<&AcmeChallenge> {
        self.challenges
            .values()
            .find(|c| c.kind == kind && c.name == name)
    }

    /// The current holder, if its lease has not expired at `now_ms` (the caller's clock).
    pub fn holder_at(&self, now_ms: u64) -> Option<OrdererLease> {
        self.lease.filter(|l| l.expires_at_ms > now_ms)
    }
}

/// Changes to [`AcmeState`]. Every write an orderer makes carries its `fencing` token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AcmeCommand {
    /// Grants the lease to `node` if it is free or expired at `now_ms`, or extends it if `node`
    /// already holds it. Answered with `Response::Lease` (the lease as it now stands) or
    /// `Rejected` naming the current holder.
    AcquireLease {
        node: u64,
        now_ms: u64,
        ttl_ms: u64,
    },
    /// Gives the lease up early (clean shutdown), so another node need not wait for expiry.
    ReleaseLease {
        node: u64,
        fencing: u64,
    },
    PutAccount {
        fencing: u64,
        account: AcmeAccount,
    },
    /// An HTTP-01 answer in the log's original encoding. Earlier builds wrote it; this build
    /// writes [`AcmeCommand::PutTypedChallenge`] instead but still applies it (as HTTP-01).
    PutChallenge {
        fencing: u64,
        challenge: Http01Challenge,
    },
    RemoveChallenge {
        fencing: u64,
        token: String,
    },
    PutOrder {
        fencing: u64,
        order: AcmeOrder,
    },
    RemoveOrder {
        fencing: u64,
        name: String,
    },
    /// The fenced form of `PutCertificate`: also clears the order and renewal request for the
    /// name.
    PutCertificate {
        fencing: u64,
        cert: Certificate,
    },
    /// `portcullis cert renew NAME`: the orderer renews `name` at its next pass.
    RequestRenewal {
        name: String,
        requested_at: u64,
    },
    /// Publishes an answer of any [`ChallengeKind`]. Appended last so existing log encodings
    /// keep their variant indices.
    PutTypedChallenge {
        fencing: u64,
        challenge: AcmeChallenge,
    },
}

fn validate_url(f: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty()
        || s.len() > MAX_URL_LEN
        || !(s.starts_with("https://") || s.starts_with("http://"))
    {
        return Err(field(f, s, "must be an http(s) URL of at most 2048 bytes"));
    }
    Ok(())
}

/// ACME tokens are base64url (RFC 8555 §8.1); anything else could not have come from a CA and
/// must never reach a URL path match.
fn validate_token(s: &str) -> Result<(), ValidationError> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(field("acme token", s, "must be 1-256 base64url characters"))
    }
}

/// A key authorization is `token.thumbprint`: both base64url, joined by one dot.
fn validate_key_authorization(token: &str, ka: &str) -> Result<(), ValidationError> {
    validate_token(token)?;
    let ok = ka.len() <= 512
        && ka
            .split_once('.')
            .is_some_and(|(t, thumb)| t == token && validate_token(thumb).is_ok());
    if ok {
        Ok(())
    } else {
        Err(field(
            "key_authorization",
            ka,
            "must be '<token>.<thumbprint>'",
        ))
    }
}

impl AcmeCommand {
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            AcmeCommand::AcquireLease { node, ttl_ms, .. } => {
                if *node == 0 {
                    return Err(field("node", "0", "node ids start at 1"));
                }
                if *ttl_ms == 0 || *ttl_ms > MAX_LEASE_TTL_MS {
                    return Err(field("ttl_ms", ttl_ms.to_string(), "must be 1..=600000"));
                }
                Ok(())
            }
            AcmeCommand::ReleaseLease { .. } => Ok(()),
            AcmeCommand::PutAccount { account, .. } => {
                validate_url("directory", &account.directory)?;
                if account.credentials.is_empty() || account.credentials.len() > MAX_CREDENTIALS_LEN
                {
                    return Err(field("credentials", "(redacted)", "must be 1-16384 bytes"));
                }
                if account.encryption.is_empty() || account.encryption.len() > 64 {
                    return Err(field(
                        "encryption",
                        account.encryption.clone(),
                        "1-64 bytes",
                    ));
                }
                Ok(())
            }
            AcmeCommand::PutChallenge { challenge, .. } => {
                // Unchanged from earlier builds, so replaying old entries decides the same.
                validate_domain_name(&challenge.name)?;
                validate_key_authorization(&challenge.token, &challenge.key_authorization)
            }
            AcmeCommand::PutTypedChallenge { challenge, .. } => {
                validate_domain_name(&challenge.name)?;
                // Every method validates a plain name: a wildcard order's authorization is for
                // the name without `*.` (RFC 8555 §7.1.3), and an answer under `*` would match
                // nothing the CA asks for.
                if challenge.name.starts_with("*.") {
                    return Err(field(
                        "challenge name",
                        challenge.name.clone(),
                        "must not be a wildcard",
                    ));
                }
                validate_key_authorization(&challenge.token, &challenge.key_authorization)
            }
            AcmeCommand::RemoveChallenge { token, .. } => validate_token(token),
            AcmeCommand::PutOrder { order, .. } => {
                validate_domain_name(&order.name)?;
                validate_url("order url", &order.url)?;
                if order.names.is_empty() || order.names.len() > 100 {
                    return Err(field("names", order.name.clone(), "1-100 names per order"));
                }
                for n in &order.names {
                    validate_domain_name(n)?;
                }
                Ok(())
            }
            AcmeCommand::RemoveOrder { name, .. } => validate_domain_name(name),
            AcmeCommand::PutCertificate { cert, .. } => {
                super::Command::PutCertificate(cert.clone()).validate()
            }
            AcmeCommand::RequestRenewal { name, .. } => validate_domain_name(name),
        }
    }
}

impl ClusterState {
    /// Applies a validated ACME command. Deterministic; never panics.
    pub(super) fn apply_acme(&mut self, cmd: &AcmeCommand) -> Response {
        let acme = &mut self.acme;
        // Every orderer write must carry the token of the lease as it stands in the log.
        let fenced = |acme: &AcmeState, fencing: u64| -> Result<(), String> {
            match acme.lease {
                Some(l) if l.fencing == fencing => Ok(()),
                Some(l) => Err(format!(
                    "stale orderer: fencing token {fencing}, current lease is node {} with token {}",
                    l.holder, l.fencing
                )),
                None => Err(format!(
                    "stale orderer: fencing token {fencing}, no lease is held"
                )),
            }
        };
        match cmd {
            AcmeCommand::AcquireLease {
                node,
                now_ms,
                ttl_ms,
            } => {
                let expires_at_ms = now_ms.saturating_add(*ttl_ms);
                match acme.lease {
                    Some(l) if l.holder == *node => {
                        // Renewal keeps the token: the holder's in-flight writes stay valid.
                        // Expiry never moves backwards, even if this proposer's clock lags.
                        let l = OrdererLease {
                            expires_at_ms: l.expires_at_ms.max(expires_at_ms),
                            ..l
                        };
                        acme.lease = Some(l);
                        Response::Lease(l)
                    }
                    Some(l) if l.expires_at_ms > *now_ms => Response::Rejected(format!(
                        "orderer lease held by node {} until {} ms",
                        l.holder, l.expires_at_ms
                    )),
                    _ => {
                        let Some(fencing) = acme.last_fencing.checked_add(1) else {
                            return Response::Rejected("fencing tokens exhausted".into());
                        };
                        let l = OrdererLease {
                            holder: *node,
                            fencing,
                            expires_at_ms,
                        };
                        acme.last_fencing = fencing;
                        acme.lease = Some(l);
                        Response::Lease(l)
                    }
                }
            }
            AcmeCommand::ReleaseLease { node, fencing } => match acme.lease {
                Some(l) if l.holder == *node && l.fencing == *fencing => {
                    acme.lease = None;
                    Response::Ok
                }
                _ => Response::Rejected(format!(
                    "node {node} does not hold the orderer lease with token {fencing}"
                )),
            },
            AcmeCommand::PutAccount { fencing, account } => {
                if let Err(m) = fenced(acme, *fencing) {
                    return Response::Rejected(m);
                }
                acme.account = Some(account.clone());
                Response::Ok
            }
            AcmeCommand::PutChallenge { fencing, challenge } => {
                if let Err(m) = fenced(acme, *fencing) {
                    return Response::Rejected(m);
                }
                acme.put_challenge(challenge.into())
            }
            AcmeCommand::PutTypedChallenge { fencing, challenge } => {
                if let Err(m) = fenced(acme, *fencing) {
                    return Response::Rejected(m);
                }
                acme.put_challenge(challenge.clone())
            }
            AcmeCommand::RemoveChallenge { fencing, token } => {
                if let Err(m) = fenced(acme, *fencing) {
                    return Response::Rejected(m);
                }
                // Idempotent: a retried cleanup must not fail.
                acme.challenges.remove(token);
                Response::Ok
            }
            AcmeCommand::PutOrder { fencing, order } => {
                if let Err(m) = fenced(acme, *fencing) {
                    return Response::Rejected(m);
                }
                if acme.orders.len() >= MAX_ACME_PENDING && !acme.orders.contains_key(&order.name) {
                    return Response::Rejected("too many pending ACME orders".into());
                }
                acme.orders.insert(order.name.clone(), order.clone());
                Response::Ok
            }
            AcmeCommand::RemoveOrder { fencing, name } => {
                if let Err(m) = fenced(acme, *fencing) {
                    return Response::Rejected(m);
                }
                acme.orders.remove(name);
                Response::Ok
            }
            AcmeCommand::PutCertificate { fencing, cert } => {
                if let Err(m) = fenced(acme, *fencing) {
                    return Response::Rejected(m);
                }
                acme.orders.remove(&cert.name);
                acme.renew_requests.remove(&cert.name);
                self.certificates.insert(cert.name.clone(), cert.clone());
                Response::Ok
            }
            AcmeCommand::RequestRenewal { name, requested_at } => {
                if acme.renew_requests.len() >= MAX_ACME_PENDING
                    && !acme.renew_requests.contains_key(name)
                {
                    return Response::Rejected("too many pending renewal requests".into());
                }
                acme.renew_requests.insert(name.clone(), *requested_at);
                Response::Ok
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Command;
    use super::*;

    fn acquire(node: u64, now_ms: u64) -> Command {
        Command::Acme(AcmeCommand::AcquireLease {
            node,
            now_ms,
            ttl_ms: 1000,
        })
    }

    fn lease(r: Response) -> OrdererLease {
        match r {
            Response::Lease(l) => l,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    fn challenge(token: &str) -> Http01Challenge {
        Http01Challenge {
            token: token.into(),
            name: "a.example.com".into(),
            key_authorization: format!("{token}.thumb"),
            created_at: 1,
        }
    }

    fn cert(name: &str) -> Certificate {
        Certificate {
            name: name.into(),
            names: vec![name.into()],
            chain_pem: "pem".into(),
            key: b"key".to_vec(),
            key_encryption: "none".into(),
            not_after: 10,
            issuer: "test".into(),
        }
    }

    #[test]
    fn lease_grant_renew_expire_and_fencing() {
        let mut s = ClusterState::default();
        let a = lease(s.apply(1, &acquire(1, 0)));
        assert_eq!((a.holder, a.fencing, a.expires_at_ms), (1, 1, 1000));
        // Another node cannot take a live lease.
        assert!(matches!(
            s.apply(2, &acquire(2, 500)),
            Response::Rejected(_)
        ));
        // The holder renews and keeps its token.
        let a2 = lease(s.apply(3, &acquire(1, 600)));
        assert_eq!((a2.fencing, a2.expires_at_ms), (1, 1600));
        // A renewal stamped by a lagging clock never shortens the lease.
        let a3 = lease(s.apply(4, &acquire(1, 100)));
        assert_eq!(a3.expires_at_ms, 1600);
        // After expiry another node gets it with a new token.
        let b = lease(s.apply(5, &acquire(2, 1600)));
        assert_eq!((b.holder, b.fencing), (2, 2));
        // The old holder's writes are now rejected; the new holder's are accepted.
        let stale = Command::Acme(AcmeCommand::PutChallenge {
            fencing: 1,
            challenge: challenge("tok"),
        });
        assert!(matches!(s.apply(6, &stale), Response::Rejected(m) if m.contains("stale")));
        let stale_cert = Command::Acme(AcmeCommand::PutCertificate {
            fencing: 1,
            cert: cert("a.example.com"),
        });
        assert!(matches!(s.apply(7, &stale_cert), Response::Rejected(_)));
        assert!(s.certificates.is_empty());
        let fresh = Command::Acme(AcmeCommand::PutChallenge {
            fencing: 2,
            challenge: challenge("tok"),
        });
        assert_eq!(s.apply(8, &fresh), Response::Ok);
        assert_eq!(s.acme.challenges["tok"].key_authorization, "tok.thumb");
        // The old holder coming back after expiry gets a new, higher token, not its old one.
        let back = lease(s.apply(9, &acquire(1, 5000)));
        assert_eq!((back.holder, back.fencing), (1, 3));
    }

    #[test]
    fn release_only_by_holder_and_tokens_never_reused() {
        let mut s = ClusterState::default();
        let a = lease(s.apply(1, &acquire(1, 0)));
        let wrong = Command::Acme(AcmeCommand::ReleaseLease {
            node: 2,
            fencing: a.fencing,
        });
        assert!(matches!(s.apply(2, &wrong), Response::Rejected(_)));
        let ok = Command::Acme(AcmeCommand::ReleaseLease {
            node: 1,
            fencing: a.fencing,
        });
        assert_eq!(s.apply(3, &ok), Response::Ok);
        assert!(s.acme.lease.is_none());
        // With no lease, no fenced write is accepted, not even with the last token.
        let w = Command::Acme(AcmeCommand::RemoveChallenge {
            fencing: a.fencing,
            token: "t".into(),
        });
        assert!(matches!(s.apply(4, &w), Response::Rejected(_)));
        let b = lease(s.apply(5, &acquire(2, 1)));
        assert_eq!(b.fencing, 2);
    }

    #[test]
    fn certificate_write_clears_order_and_renewal_request() {
        let mut s = ClusterState::default();
        let l = lease(s.apply(1, &acquire(1, 0)));
        let order = AcmeOrder {
            name: "a.example.com".into(),
            names: vec!["a.example.com".into()],
            url: "https://ca/order/1".into(),
            started_at: 1,
        };
        let put = Command::Acme(AcmeCommand::PutOrder {
            fencing: l.fencing,
            order,
        });
        assert_eq!(s.apply(2, &put), Response::Ok);
        let renew = Command::Acme(AcmeCommand::RequestRenewal {
            name: "a.example.com".into(),
            requested_at: 5,
        });
        assert_eq!(s.apply(3, &renew), Response::Ok);
        let c = Command::Acme(AcmeCommand::PutCertificate {
            fencing: l.fencing,
            cert: cert("a.example.com"),
        });
        assert_eq!(s.apply(4, &c), Response::Ok);
        assert!(s.acme.orders.is_empty());
        assert!(s.acme.renew_requests.is_empty());
        assert_eq!(s.certificates["a.example.com"].issuer, "test");
    }

    #[test]
    fn validation_rejects_malformed_input() {
        let bad = [
            AcmeCommand::AcquireLease {
                node: 0,
                now_ms: 0,
                ttl_ms: 10,
            },
            AcmeCommand::AcquireLease {
                node: 1,
                now_ms: 0,
                ttl_ms: MAX_LEASE_TTL_MS + 1,
            },
            AcmeCommand::PutChallenge {
                fencing: 1,
                challenge: Http01Challenge {
                    token: "../etc".into(),
                    ..challenge("x")
                },
            },
            AcmeCommand::PutChallenge {
                fencing: 1,
                challenge: Http01Challenge {
                    key_authorization: "other.thumb".into(),
                    ..challenge("tok")
                },
            },
            AcmeCommand::PutAccount {
                fencing: 1,
                account: AcmeAccount {
                    directory: "ftp://x".into(),
                    credentials: "{}".into(),
                    encryption: "none".into(),
                },
            },
            AcmeCommand::PutOrder {
                fencing: 1,
                order: AcmeOrder {
                    name: "a.example.com".into(),
                    names: vec![],
                    url: "https://ca/o".into(),
                    started_at: 0,
                },
            },
            AcmeCommand::RequestRenewal {
                name: "Not A Name".into(),
                requested_at: 0,
            },
        ];
        for c in bad {
            let cmd = Command::Acme(c);
            assert!(cmd.validate().is_err(), "{cmd:?} should be invalid");
            let mut s = ClusterState::default();
            assert!(matches!(s.apply(1, &cmd), Response::Rejected(_)));
            assert_eq!(s, ClusterState::default());
        }
    }

    fn typed(kind: ChallengeKind, name: &str, token: &str) -> AcmeChallenge {
        AcmeChallenge {
            kind,
            name: name.into(),
            ..(&challenge(token)).into()
        }
    }

    #[test]
    fn typed_challenges_are_fenced_found_by_kind_and_name_and_never_wildcards() {
        let mut s = ClusterState::default();
        let l = lease(s.apply(1, &acquire(1, 0)));
        let put = |c: AcmeChallenge, fencing: u64| {
            Command::Acme(AcmeCommand::PutTypedChallenge {
                fencing,
                challenge: c,
            })
        };
        let alpn = typed(ChallengeKind::TlsAlpn01, "a.example.com", "t1");
        assert!(matches!(
            s.apply(2, &put(alpn.clone(), l.fencing + 1)),
            Response::Rejected(m) if m.contains("stale")
        ));
        assert_eq!(s.apply(3, &put(alpn.clone(), l.fencing)), Response::Ok);
        let dns = typed(ChallengeKind::Dns01, "example.com", "t2");
        assert_eq!(s.apply(4, &put(dns.clone(), l.fencing)), Response::Ok);
        assert_eq!(
            s.acme
                .challenge_for(ChallengeKind::TlsAlpn01, "a.example.com"),
            Some(&alpn)
        );
        assert_eq!(
            s.acme.challenge_for(ChallengeKind::Http01, "a.example.com"),
            None
        );
        assert_eq!(
            s.acme.challenge_for(ChallengeKind::Dns01, "example.com"),
            Some(&dns)
        );
        let before = s.clone();
        let wild = typed(ChallengeKind::Dns01, "*.example.com", "t3");
        assert!(put(wild.clone(), l.fencing).validate().is_err());
        assert!(matches!(
            s.apply(5, &put(wild, l.fencing)),
            Response::Rejected(_)
        ));
        assert_eq!(s, before);
    }

    /// `PutChallenge` entries written by builds before challenge kinds existed still decode
    /// (bincode is positional) and apply as HTTP-01.
    #[test]
    fn legacy_put_challenge_entries_still_decode() {
        // The pre-kind wire shape, spelled out independently of the current types.
        #[derive(Serialize)]
        struct OldChallenge {
            token: String,
            name: String,
            key_authorization: String,
            created_at: u64,
        }
        #[derive(Serialize)]
        #[allow(dead_code)]
        enum OldAcmeCommand {
            AcquireLease {
                node: u64,
                now_ms: u64,
                ttl_ms: u64,
            },
            ReleaseLease {
                node: u64,
                fencing: u64,
            },
            PutAccount {
                fencing: u64,
                account: AcmeAccount,
            },
            PutChallenge {
                fencing: u64,
                challenge: OldChallenge,
            },
        }
        let old = OldAcmeCommand::PutChallenge {
            fencing: 1,
            challenge: OldChallenge {
                token: "tok".into(),
                name: "a.example.com".into(),
                key_authorization: "tok.thumb".into(),
                created_at: 7,
            },
        };
        let bytes = bincode::serialize(&old).expect("encode");
        let decoded: AcmeCommand = bincode::deserialize(&bytes).expect("old entry decodes");
        assert_eq!(
            decoded,
            AcmeCommand::PutChallenge {
                fencing: 1,
                challenge: Http01Challenge {
                    token: "tok".into(),
                    name: "a.example.com".into(),
                    key_authorization: "tok.thumb".into(),
                    created_at: 7,
                },
            }
        );
        let mut s = ClusterState::default();
        lease(s.apply(1, &acquire(1, 0)));
        assert_eq!(s.apply(2, &Command::Acme(decoded)), Response::Ok);
        assert_eq!(s.acme.challenges["tok"].kind, ChallengeKind::Http01);
    }

    #[test]
    fn lease_arithmetic_saturates() {
        let mut s = ClusterState::default();
        let l = lease(s.apply(1, &acquire(1, u64::MAX)));
        assert_eq!(l.expires_at_ms, u64::MAX);
        s.acme.lease = None;
        s.acme.last_fencing = u64::MAX;
        assert!(matches!(s.apply(2, &acquire(1, 0)), Response::Rejected(_)));
    }
}
