//! `portcullis domain …`: claim, verify, list and remove custom domains.

use portcullis_proto::admin::{self as pb, Empty};
use serde::Serialize;

use super::args::{DomainCmd, Global};
use super::output::{print_json, print_list, rpc};

#[derive(Serialize)]
struct DomainOut {
    name: String,
    app: String,
    port: u32,
    token: String,
    verified: bool,
    passthrough: bool,
}

fn domain_out(d: pb::Domain) -> DomainOut {
    DomainOut {
        name: d.name,
        app: d.app,
        port: d.port,
        token: d.token,
        verified: d.verified,
        passthrough: d.passthrough,
    }
}

pub async fn run(g: &Global, cmd: DomainCmd) -> anyhow::Result<()> {
    let mut c = g.target().connect().await?;
    match cmd {
        DomainCmd::Add {
            domain,
            app,
            port,
            passthrough,
        } => {
            let d = domain_out(rpc(c
                .domain_add(pb::DomainAddRequest {
                    name: domain,
                    app,
                    port: u32::from(port),
                    passthrough,
                })
                .await)?);
            if g.json {
                return print_json(&d);
            }
            println!("claimed {} for app {} port {}", d.name, d.app, d.port);
            println!(
                "create these DNS records, then run `portcullis domain verify {}`:",
                d.name
            );
            println!(
                "  {} TXT \"{}\"",
                crate::edge::custom_domain::challenge_name(&d.name),
                d.token
            );
            println!(
                "  {} TXT \"{}:{}\"",
                crate::edge::custom_domain::app_address_name(&d.name),
                d.app,
                d.port
            );
            println!("  {} CNAME (or A/AAAA) pointing at the gateways", d.name);
        }
        DomainCmd::Verify { domain } => {
            let r = rpc(c.domain_verify(pb::DomainName { name: domain }).await)?;
            let d = r.domain.map(domain_out);
            if g.json {
                return print_json(&serde_json::json!({
                    "domain": d,
                    "routed_port": r.routed_port,
                    "log_index": r.log_index,
                }));
            }
            if let Some(d) = d {
                println!(
                    "verified {}: routes to app {} port {}",
                    d.name, d.app, r.routed_port
                );
            }
        }
        DomainCmd::List => {
            let list: Vec<DomainOut> = rpc(c.domain_list(Empty {}).await)?
                .domains
                .into_iter()
                .map(domain_out)
                .collect();
            print_list(g, &list, |d| {
                println!(
                    "{:<40} app {:<16} port {:<5} {:<10} {}{}",
                    d.name,
                    d.app,
                    d.port,
                    if d.verified { "verified" } else { "unverified" },
                    d.token,
                    if d.passthrough { " passthrough" } else { "" }
                )
            })?;
        }
        DomainCmd::Remove { domain } => {
            let r = rpc(c
                .domain_remove(pb::DomainName {
                    name: domain.clone(),
                })
                .await)?;
            if g.json {
                return print_json(
                    &serde_json::json!({ "removed": domain, "log_index": r.log_index }),
                );
            }
            println!("removed {domain}");
        }
    }
    Ok(())
}
