//! DNS-01 (RFC 8555 §8.4) through RFC 2136 dynamic updates signed with TSIG (RFC 8945).
//!
//! Only the orderer lease holder uses this: it adds `_acme-challenge.<name> TXT <digest>` at the
//! zone's primary server, waits until that server answers the record (instead of sleeping a
//! fixed time), lets the CA validate, then deletes exactly that record value. Messages are built
//! and signed with hickory-proto; the transport is one TCP exchange per message (RFC 7766
//! length-prefixed), bounded by a timeout, which avoids UDP truncation and spoofing concerns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{update_message, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, RecordSet, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::config::{in_zone, Dns01Config};

/// Allowed clock difference between this node and the DNS server for TSIG, seconds (RFC 8945
/// §10 recommends 300).
const TSIG_FUDGE: u16 = 300;
/// Largest DNS message accepted over TCP; answers here are a handful of TXT records.
const MAX_RESPONSE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Dns01Error {
    #[error("DNS-01 needs an [acme.dns01] section")]
    NotConfigured,
    #[error("TSIG secret file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TSIG secret file {path}: {reason}")]
    Secret { path: PathBuf, reason: String },
    #[error("DNS name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("{name:?} is outside the zone {zone:?}")]
    OutsideZone { name: String, zone: String },
    #[error("DNS server {server}: {source}")]
    Io {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("DNS server {server} did not answer within {limit:?}")]
    Timeout { server: SocketAddr, limit: Duration },
    #[error("DNS message: {0}")]
    Proto(String),
    #[error("DNS server {server} refused the {what}: {rcode}")]
    Rcode {
        server: SocketAddr,
        what: &'static str,
        rcode: ResponseCode,
    },
    #[error("DNS server {server}'s answer to the update failed TSIG verification: {reason}")]
    Tsig { server: SocketAddr, reason: String },
    #[error("_acme-challenge.{name} TXT was not answered by {server} within {waited:?}")]
    NotVisible {
        name: String,
        server: SocketAddr,
        waited: Duration,
    },
}

fn proto(e: impl std::fmt::Display) -> Dns01Error {
    Dns01Error::Proto(e.to_string())
}

/// The base64 TSIG secret from a key file: the secret alone, a BIND `key` clause
/// (`secret "…";`, as `tsig-keygen` writes) or Knot's `keymgr -t` output (`secret: …`).
pub fn parse_secret(text: &str) -> Result<Vec<u8>, String> {
    // The `secret` line of either format (not a substring search: a key may be named
    // "secret-something").
    let secret_line = text.lines().find_map(|l| {
        let l = l.trim_start().trim_start_matches("- ");
        let rest = l.strip_prefix("secret")?;
        rest.starts_with(|c: char| c.is_whitespace() || c == ':' || c == '"')
            .then_some(rest)
    });
    let token = match secret_line {
        Some(rest) => rest
            .trim_start_matches(|c: char| c.is_whitespace() || c == ':' || c == '"')
            .split(|c: char| c.is_whitespace() || c == '"' || c == ';')
            .next()
            .unwrap_or(""),
        None => {
            let mut words = text.split_whitespace();
            match (words.next(), words.next()) {
                (Some(w), None) => w,
                _ => {
                    return Err(
                        "expected one base64 secret, a BIND key clause or keymgr output".into(),
                    )
                }
            }
        }
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|e| format!("secret is not base64: {e}"))?;
    if key.len() < 16 {
        return Err(format!(
            "secret is {} bytes; use at least 16 (tsig-keygen and keymgr make 32)",
            key.len()
        ));
    }
    Ok(key)
}

fn read_secret(path: &Path) -> Result<Vec<u8>, Dns01Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Dns01Error::SecretFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_secret(&text).map_err(|reason| Dns01Error::Secret {
        path: path.to_path_buf(),
        reason,
    })
}

fn fqdn(name: &str) -> Result<Name, Dns01Error> {
    let mut n = Name::from_ascii(name).map_err(|e| Dns01Error::Name {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    n.set_fqdn(true);
    Ok(n)
}

/// Talks to one authoritative server for one zone.
pub struct Dns01Client {
    server: SocketAddr,
    zone: String,
    zone_name: Name,
    signer: TSigner,
    ttl: u32,
    /// Per exchange (connect, send, answer).
    timeout: Duration,
    propagation: Duration,
}

impl Dns01Client {
    /// Reads the TSIG secret from its file. `request_timeout` bounds each exchange.
    pub fn from_config(cfg: &Dns01Config, request_timeout: Duration) -> Result<Self, Dns01Error> {
        let server = cfg.server.ok_or(Dns01Error::NotConfigured)?;
        let path = cfg
            .tsig_secret_file
            .as_deref()
            .ok_or(Dns01Error::NotConfigured)?;
        let key = read_secret(path)?;
        let signer = TSigner::new(
            key,
            TsigAlgorithm::HmacSha256,
            fqdn(&cfg.tsig_key_name)?,
            TSIG_FUDGE,
        )
        .map_err(proto)?;
        Ok(Dns01Client {
            server,
            zone: cfg.zone.clone(),
            zone_name: fqdn(&cfg.zone)?,
            signer,
            ttl: cfg.ttl,
            timeout: request_timeout.min(Duration::from_secs(30)),
            propagation: Duration::from_secs(cfg.propagation_timeout_secs),
        })
    }

    /// `_acme-challenge.<name>` as a DNS name, checked to be inside the zone (hickory's update
    /// builders assert that, so it must hold before they are called).
    fn record_name(&self, name: &str) -> Result<Name, Dns01Error> {
        if !in_zone(name, &self.zone) {
            return Err(Dns01Error::OutsideZone {
                name: name.to_string(),
                zone: self.zone.clone(),
            });
        }
        let n = fqdn(&format!("_acme-challenge.{name}"))?;
        if !self.zone_name.zone_of(&n) {
            return Err(Dns01Error::OutsideZone {
                name: name.to_string(),
                zone: self.zone.clone(),
            });
        }
        Ok(n)
    }

    fn rrset(&self, name: &Name, value: &str) -> RecordSet {
        let mut rrset = RecordSet::with_ttl(name.clone(), RecordType::TXT, self.ttl);
        rrset.add_rdata(RData::TXT(TXT::new(vec![value.to_string()])));
        rrset
    }

    /// Adds `_acme-challenge.<name> TXT value` (other values of the record set stay: two orders
    /// for the same name may be in flight).
    pub async fn add_txt(&self, name: &str, value: &str) -> Result<(), Dns01Error> {
        let rname = self.record_name(name)?;
        let msg = update_message::append(
            self.rrset(&rname, value),
            self.zone_name.clone(),
            false,
            false,
        );
        self.update(msg, "update adding the TXT record").await
    }

    /// Deletes exactly that value (RFC 2136 §2.5.4); removing a record that is gone succeeds.
    pub async fn remove_txt(&self, name: &str, value: &str) -> Result<(), Dns01Error> {
        let rname = self.record_name(name)?;
        let msg = update_message::delete_by_rdata(
            self.rrset(&rname, value),
            self.zone_name.clone(),
            false,
        );
        self.update(msg, "update removing the TXT record").await
    }

    /// Waits until the server answers the TXT record with `value`: the CA queries the
    /// authoritative servers, and an update may take a moment to reach the served zone.
    pub async fn wait_visible(&self, name: &str, value: &str) -> Result<(), Dns01Error> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.txt_values(name).await {
                Ok(values) if values.iter().any(|v| v == value) => return Ok(()),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "querying the DNS-01 record"),
            }
            if started.elapsed() + delay > self.propagation {
                return Err(Dns01Error::NotVisible {
                    name: name.to_string(),
                    server: self.server,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// The TXT strings the server answers for `_acme-challenge.<name>` (authoritative data, no
    /// recursion).
    pub async fn txt_values(&self, name: &str) -> Result<Vec<String>, Dns01Error> {
        let rname = self.record_name(name)?;
        let mut msg = Message::new();
        msg.set_id(rand::random())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(false)
            .add_query(Query::query(rname, RecordType::TXT));
        let response = self.exchange(&msg).await?;
        if response.response_code() != ResponseCode::NoError
            && response.response_code() != ResponseCode::NXDomain
        {
            return Err(Dns01Error::Rcode {
                server: self.server,
                what: "TXT query",
                rcode: response.response_code(),
            });
        }
        Ok(response
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::TXT(t) => Some(
                    t.txt_data()
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect())
    }

    /// Signs and sends an UPDATE; success needs NOERROR and a correctly signed answer (an
    /// unsigned NOERROR could be forged by anyone on the path).
    async fn update(&self, mut msg: Message, what: &'static str) -> Result<(), Dns01Error> {
        let now = u32::try_from(super::unix_now()).unwrap_or(u32::MAX);
        let mut verifier = msg.finalize(&self.signer, now).map_err(proto)?;
        let (response, bytes) = self.exchange_raw(&msg).await?;
        if response.response_code() != ResponseCode::NoError {
            return Err(Dns01Error::Rcode {
                server: self.server,
                what,
                rcode: response.response_code(),
            });
        }
        match verifier.as_mut() {
            Some(verify) => verify(&bytes).map(|_| ()).map_err(|e| Dns01Error::Tsig {
                server: self.server,
                reason: e.to_string(),
            }),
            None => Err(Dns01Error::Tsig {
                server: self.server,
                reason: "the signer produced no verifier".into(),
            }),
        }
    }

    async fn exchange(&self, msg: &Message) -> Result<Message, Dns01Error> {
        Ok(self.exchange_raw(msg).await?.0)
    }

    /// One request and its answer over TCP, within `timeout` overall.
    async fn exchange_raw(&self, msg: &Message) -> Result<(Message, Vec<u8>), Dns01Error> {
        let request = msg.to_vec().map_err(proto)?;
        let len = u16::try_from(request.len()).map_err(|_| proto("request larger than 64 KiB"))?;
        let server = self.server;
        let io = |source| Dns01Error::Io { server, source };
        let exchange = async {
            let mut s = TcpStream::connect(server).await.map_err(io)?;
            let mut framed = Vec::with_capacity(request.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&request);
            s.write_all(&framed).await.map_err(io)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.map_err(io)?;
            let len = usize::from(u16::from_be_bytes(len));
            if len > MAX_RESPONSE {
                return Err(proto("answer too large"));
            }
            let mut buf = vec![0u8; len];
            s.read_exact(&mut buf).await.map_err(io)?;
            Ok::<_, Dns01Error>(buf)
        };
        let bytes = timeout(self.timeout, exchange)
            .await
            .map_err(|_| Dns01Error::Timeout {
                server,
                limit: self.timeout,
            })??;
        let response = Message::from_vec(&bytes).map_err(proto)?;
        if response.id() != msg.id() || response.message_type() != MessageType::Response {
            return Err(proto("answer does not match the request"));
        }
        Ok((response, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a2V5LWZvci10ZXN0cy1vbmx5LTMyLWJ5dGVzLWxvbmchIQ==";

    #[test]
    fn secret_file_formats() {
        let expected = base64::engine::general_purpose::STANDARD
            .decode(SECRET)
            .expect("b64");
        assert_eq!(parse_secret(&format!("{SECRET}\n")), Ok(expected.clone()));
        let bind =
            format!("key \"acme\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{SECRET}\";\n}};\n");
        assert_eq!(parse_secret(&bind), Ok(expected.clone()));
        let knot = format!(
            "# hmac-sha256:acme:{SECRET}\nkey:\n  - id: secret-key\n    algorithm: hmac-sha256\n    secret: {SECRET}\n"
        );
        assert_eq!(parse_secret(&knot), Ok(expected));
        assert!(parse_secret("not base64!").is_err());
        assert!(parse_secret("c2hvcnQ=").is_err(), "too short");
        assert!(parse_secret("two words").is_err());
        assert!(parse_secret("").is_err());
    }

    fn client(addr: SocketAddr, secret_file: PathBuf) -> Dns01Client {
        let cfg = Dns01Config {
            server: Some(addr),
            zone: "example.com".into(),
            tsig_key_name: "acme-key".into(),
            tsig_secret_file: Some(secret_file),
            propagation_timeout_secs: 1,
            ..Dns01Config::default()
        };
        Dns01Client::from_config(&cfg, Duration::from_secs(2)).expect("client")
    }

    #[tokio::test]
    async fn update_is_signed_and_names_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key");
        std::fs::write(&key, SECRET).expect("write");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let c = client(addr, key);
        assert!(matches!(
            c.record_name("www.example.org"),
            Err(Dns01Error::OutsideZone { .. })
        ));
        assert_eq!(
            c.record_name("example.com").expect("apex").to_ascii(),
            "_acme-challenge.example.com."
        );
        // A server that answers the update unsigned: the client must not believe it.
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.expect("len");
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf).await.expect("body");
            let req = Message::from_vec(&buf).expect("parse");
            assert_eq!(req.op_code(), OpCode::Update);
            assert!(req
                .signature()
                .iter()
                .any(|r| r.record_type() == RecordType::TSIG));
            assert_eq!(req.name_servers().len(), 1, "one update record");
            let mut resp = Message::new();
            resp.set_id(req.id())
                .set_message_type(MessageType::Response)
                .set_op_code(OpCode::Update);
            let out = resp.to_vec().expect("encode");
            let mut framed = u16::try_from(out.len())
                .expect("len")
                .to_be_bytes()
                .to_vec();
            framed.extend_from_slice(&out);
            s.write_all(&framed).await.expect("write");
        });
        let r = c.add_txt("www.example.com", "value").await;
        assert!(matches!(r, Err(Dns01Error::Tsig { .. })), "{r:?}");
        server.await.expect("server");
    }
}
