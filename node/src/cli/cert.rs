//! `portcullis cert …`: import, list and renew certificates.

use anyhow::Context;
use portcullis_proto::admin::{self as pb, Empty, PutCertificateRequest};
use serde::Serialize;

use super::args::{CertCmd, Global};
use super::output::{print_json, print_list, rpc};

#[derive(Serialize)]
pub(super) struct CertOut {
    name: String,
    names: Vec<String>,
    not_after: u64,
    issuer: String,
    key_encryption: String,
}

pub(super) fn cert_out(c: pb::CertificateInfo) -> CertOut {
    CertOut {
        name: c.name,
        names: c.names,
        not_after: c.not_after,
        issuer: c.issuer,
        key_encryption: c.key_encryption,
    }
}

pub async fn run(g: &Global, cmd: CertCmd) -> anyhow::Result<()> {
    let mut c = g.target().connect().await?;
    match cmd {
        CertCmd::Import { name, cert, key } => {
            let chain_pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("read {}", cert.display()))?;
            let key_pem =
                std::fs::read_to_string(&key).with_context(|| format!("read {}", key.display()))?;
            let info = cert_out(rpc(c
                .put_certificate(PutCertificateRequest {
                    name,
                    chain_pem,
                    key_pem,
                })
                .await)?);
            if g.json {
                return print_json(&info);
            }
            println!(
                "imported certificate {} (names {:?}, expires {})",
                info.name, info.names, info.not_after
            );
        }
        CertCmd::List => {
            let certs: Vec<CertOut> = rpc(c.list_certificates(Empty {}).await)?
                .certificates
                .into_iter()
                .map(cert_out)
                .collect();
            print_list(g, &certs, |cert| {
                println!(
                    "{:<32} expires {}  names {:?}",
                    cert.name, cert.not_after, cert.names
                )
            })?;
        }
        CertCmd::Renew { name } => {
            let r = rpc(c
                .renew_certificate(portcullis_proto::admin::CertificateName { name: name.clone() })
                .await)?;
            if g.json {
                return print_json(&serde_json::json!({ "name": name, "log_index": r.log_index }));
            }
            println!("renewal of {name} requested; the ACME orderer replaces it at its next pass");
        }
    }
    Ok(())
}
