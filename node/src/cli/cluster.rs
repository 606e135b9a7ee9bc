//! `portcullis cluster …`: PKI, bootstrap, membership, status.

use anyhow::Context;
use portcullis_proto::admin::{
    self as pb, AddLearnerRequest, ClusterStatusRequest, InitRequest, NodeIdRequest,
};
use serde::Serialize;

use super::args::{ClusterCmd, Global};
use super::output::{print_json, rpc};

#[derive(Serialize)]
pub(super) struct MemberOut {
    id: u64,
    region: String,
    voter: bool,
    rpc_addr: String,
    admin_addr: String,
}

pub(super) fn members_out(ms: &[pb::Member]) -> Vec<MemberOut> {
    ms.iter()
        .map(|m| MemberOut {
            id: m.id,
            region: m.region.clone(),
            voter: m.voter,
            rpc_addr: m.rpc_addr.clone(),
            admin_addr: m.admin_addr.clone(),
        })
        .collect()
}

#[derive(Serialize)]
pub(super) struct StatusOut {
    node_id: u64,
    leader_id: Option<u64>,
    term: u64,
    last_applied: u64,
    last_log_index: u64,
    state: String,
    region: String,
    snapshot_index: u64,
    purged_index: u64,
    members: Vec<MemberOut>,
    name_collisions: Vec<String>,
}

/// One member as a table line: id, role, region, cluster RPC address.
fn print_member(id: u64, voter: bool, region: &str, rpc_addr: &str) {
    let role = if voter { "voter" } else { "learner" };
    println!("  {id:>4}  {role:<8} {region:<12} {rpc_addr}");
}

pub(super) fn print_membership(
    g: &Global,
    r: pb::MembershipReply,
    what: &str,
) -> anyhow::Result<()> {
    if g.json {
        #[derive(Serialize)]
        struct Out {
            log_index: u64,
            leader_id: u64,
            members: Vec<MemberOut>,
        }
        return print_json(&Out {
            log_index: r.log_index,
            leader_id: r.leader_id,
            members: members_out(&r.members),
        });
    }
    println!("{what} (log index {}); leader {}", r.log_index, r.leader_id);
    for m in &r.members {
        print_member(m.id, m.voter, &m.region, &m.rpc_addr);
    }
    Ok(())
}

pub(super) fn parse_member(s: &str) -> anyhow::Result<pb::Member> {
    let (id, rest) = s
        .split_once('=')
        .with_context(|| format!("member {s:?}: expected ID=RPC_ADDR[@REGION]"))?;
    let id: u64 = id
        .parse()
        .with_context(|| format!("member {s:?}: id {id:?} is not a number"))?;
    let (addr, region) = rest.split_once('@').unwrap_or((rest, ""));
    Ok(pb::Member {
        id,
        region: region.into(),
        voter: true,
        rpc_addr: addr.into(),
        admin_addr: String::new(),
    })
}

pub async fn run(g: &Global, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Init {
            pki: Some(dir),
            node_ids,
            ..
        } => {
            crate::pki::init(&dir, &node_ids)?;
            println!(
                "wrote cluster CA, admin token and {} node certificate(s) to {}",
                node_ids.len(),
                dir.display()
            );
            println!(
                "keep {} offline; nodes only need ca.pem and their own node-<id> files",
                dir.join("ca.key").display()
            );
            Ok(())
        }
        ClusterCmd::Init {
            pki: None, members, ..
        } => {
            let members = members
                .iter()
                .map(|m| parse_member(m))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut c = g.target().connect().await?;
            let r = rpc(c.init(InitRequest { members }).await)?;
            print_membership(g, r, "initialized")
        }
        ClusterCmd::IssueCert { pki, node_id } => {
            let dir = crate::pki::issue(&pki, node_id)?;
            println!("issued certificate for node {node_id} in {}", dir.display());
            Ok(())
        }
        ClusterCmd::Status => {
            let mut c = g.target().connect().await?;
            let s = rpc(c.cluster_status(ClusterStatusRequest {}).await)?;
            let out = StatusOut {
                node_id: s.node_id,
                leader_id: (s.leader_id != 0).then_some(s.leader_id),
                term: s.term,
                last_applied: s.last_applied,
                last_log_index: s.last_log_index,
                state: s.state,
                region: s.region,
                snapshot_index: s.snapshot_index,
                purged_index: s.purged_index,
                members: members_out(&s.members),
                name_collisions: s.name_collisions,
            };
            if g.json {
                return print_json(&out);
            }
            let leader = out
                .leader_id
                .map_or_else(|| "none known".to_string(), |l| l.to_string());
            println!(
                "node {} ({}, {}), term {}, leader {leader}",
                out.node_id, out.region, out.state, out.term
            );
            println!(
                "last applied {}, last log {}",
                out.last_applied, out.last_log_index
            );
            for m in &out.members {
                print_member(m.id, m.voter, &m.region, &m.rpc_addr);
            }
            if !out.name_collisions.is_empty() {
                println!(
                    "name collisions ({}): the app route is served; remove the instances (portcullis cvm remove)",
                    out.name_collisions.len()
                );
                for c in &out.name_collisions {
                    println!("  {c}");
                }
            }
            Ok(())
        }
        ClusterCmd::AddLearner {
            id,
            rpc_addr,
            region,
            admin_addr,
            no_wait,
        } => {
            let mut c = g.target().connect().await?;
            let r = rpc(c
                .add_learner(AddLearnerRequest {
                    id,
                    rpc_addr,
                    region,
                    admin_addr,
                    blocking: !no_wait,
                })
                .await)?;
            print_membership(g, r, &format!("added learner {id}"))
        }
        ClusterCmd::Promote { id } => {
            let mut c = g.target().connect().await?;
            let r = rpc(c.promote(NodeIdRequest { id }).await)?;
            print_membership(g, r, &format!("promoted {id}"))
        }
        ClusterCmd::Remove { id } => {
            let mut c = g.target().connect().await?;
            let r = rpc(c.remove(NodeIdRequest { id }).await)?;
            print_membership(g, r, &format!("removed {id}"))
        }
        ClusterCmd::TransferLeader { id } => {
            let mut c = g.target().connect().await?;
            let r = rpc(c.transfer_leader(NodeIdRequest { id }).await)?;
            print_membership(g, r, &format!("leadership moved to {id}"))
        }
    }
}
