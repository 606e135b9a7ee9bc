//! One chaos run: topology, cluster, workload, the fault schedule, then the checks and the report.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use portcullis_proto::admin::KvGetRequest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::cluster::{Cluster, Membership};
use super::link::{DeviceSpec, LinkLayer, LinkParams, LinkStats};
use super::outage::{self, Down, MajorityDataPlane, Span};
use super::probe::DataPlane;
use super::samples::GatewayStats;
use super::scenario::{Expect, FaultKind, Scenario, Target};
use super::topology::{is_root, node_ns, wan_dev, wan_ip, Topology};
use super::wgl::{self, CheckOptions, Event, Outcome};
use super::workload::{self, History};

/// What happened to one scheduled fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub index: usize,
    pub kind: String,
    pub target: u64,
    pub at_ms: u64,
    pub healed_at_ms: u64,
    /// The leader when the fault started.
    pub leader_before: Option<u64>,
    /// Whether the fault hit the leader (so a new election was expected).
    pub leader_affected: bool,
    /// Time from the fault until the rest of the cluster reported a new leader.
    pub election_ms: Option<u64>,
    pub new_leader: Option<u64>,
    /// Partition faults: the gateways that had to keep serving HTTPS meanwhile (outage.rs);
    /// `None` for other kinds.
    pub majority_side: Option<Vec<u64>>,
    /// The nodes this fault took down or cut off from the majority.
    pub cut_off: Vec<u64>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub file: String,
    pub seed: u64,
    pub nodes: u64,
    pub duration_secs: u64,
    pub expect: Expect,
    /// Operations with a completion (ok + fail + info).
    pub operations: usize,
    pub ok: usize,
    /// Definitely not applied (failed reads; CAS never fails definitely here).
    pub failed: usize,
    /// Timed out or errored writes: may or may not have taken effect.
    pub indeterminate: usize,
    pub reads_ok: usize,
    pub cas_ok_true: usize,
    pub cas_ok_false: usize,
    pub writes_ok: usize,
    pub faults: Vec<FaultReport>,
    /// Per node, the longest stretch during the run in which it answered no client operation.
    pub longest_admin_outage_ms: BTreeMap<u64, u64>,
    /// `ok`, or why the HTTPS data-plane probe did not run.
    pub data_plane_probe: String,
    /// Per gateway: HTTPS GETs of the demo app every 100 ms during the run.
    pub data_plane: BTreeMap<u64, GatewayStats>,
    /// The majority side's data plane during each partition fault, against the scenario's
    /// `max_majority_outage_ms`; `ok = false` fails the run.
    pub majority_data_plane: MajorityDataPlane,
    /// What the WAN link layer forwarded and dropped.
    pub wan: LinkStats,
    pub linearizable: bool,
    pub check_report: String,
    /// All nodes returned the same value for every key after healing.
    pub converged: bool,
    pub convergence_detail: String,
    /// The converged state is one some linearization of the history produces (no acknowledged
    /// write lost).
    pub final_state_ok: bool,
    pub final_state: BTreeMap<String, Option<String>>,
    pub node_crashes: Vec<String>,
    /// The run met its expectation (`expect`).
    pub passed: bool,
    pub run_dir: String,
    pub elapsed_secs: f64,
}

/// Options from the command line.
pub struct RunOptions {
    pub scenario_path: PathBuf,
    pub seed: Option<u64>,
    pub bin: PathBuf,
    pub report: Option<PathBuf>,
    pub keep: bool,
}

pub fn reproduce_command(o: &RunOptions, seed: u64) -> String {
    format!(
        "sudo target/debug/portcullis-chaos run {} --seed {seed} --portcullis {}",
        o.scenario_path.display(),
        o.bin.display()
    )
}

/// Runs a scenario end to end. Everything it starts is torn down when this returns (or when
/// the future is dropped, e.g. on Ctrl-C): the cluster and topology are drop guards.
pub async fn run(o: &RunOptions) -> anyhow::Result<Report> {
    let mut sc = Scenario::load(&o.scenario_path)?;
    if let Some(s) = o.seed {
        sc.seed = s;
    }
    if !is_root() {
        bail!(
            "portcullis-chaos needs root: it creates network namespaces, veth links and nftables \
             rules (run it with sudo)"
        );
    }
    if !o.bin.exists() {
        bail!(
            "portcullis binary {} not found (build it: cargo build -p portcullis-node)",
            o.bin.display()
        );
    }
    let bin = std::path::absolute(&o.bin)?;
    let started = Instant::now();
    let run_dir = tempfile::Builder::new()
        .prefix(&format!("pcchaos-{}-{}-", sc.name, sc.seed))
        .tempdir()
        .context("create run dir")?
        // Kept on errors and interrupts too: the node logs are what explains them.
        .keep();
    eprintln!("--- run dir {} (node logs)", run_dir.display());
    let topo = Topology::create(sc.nodes)?;
    let wan = start_wan(&sc)?;
    let mut cluster = Cluster::start(&run_dir, &bin, &sc)?;
    let leader = cluster.bootstrap(Duration::from_secs(60)).await?;
    eprintln!("--- cluster of {} formed, leader {leader}", sc.nodes);
    let data_plane = DataPlane::setup(&cluster, &bin, &run_dir).await;
    if let Err(e) = &data_plane {
        eprintln!("--- data-plane probe unavailable: {e:#}");
    }

    let mut rng = StdRng::seed_from_u64(sc.seed);
    let t0 = Instant::now();
    let history = History::new(t0);
    let deadline = t0 + Duration::from_secs(sc.duration_secs);
    let admins: Vec<(u64, _)> = cluster
        .nodes
        .iter()
        .map(|n| (n.id, n.admin.clone()))
        .collect();
    let mut clients = Vec::new();
    for p in 1..=sc.clients.count {
        clients.push(tokio::spawn(workload::client(
            p,
            sc.clients.clone(),
            sc.seed,
            admins.clone(),
            history.clone(),
            deadline,
        )));
    }

    let ids = cluster.ids();
    let probe = async {
        match &data_plane {
            Ok(dp) => Some(dp.run(ids.clone(), t0, deadline).await),
            Err(_) => None,
        }
    };
    let schedule = async {
        // Faults may overlap in time (scenario.rs checks that overlapping ones cannot undo
        // each other and leave a quorum), so the schedule is a timeline of starts and heals
        // rather than one fault after another.
        let mut faults = Vec::new();
        let mut order: Vec<usize> = (0..sc.faults.len()).collect();
        order.sort_by(|a, b| sc.faults[*a].at_secs.total_cmp(&sc.faults[*b].at_secs));
        let mut pending: std::collections::VecDeque<usize> = order.into();
        let mut active: Vec<ActiveFault> = Vec::new();
        let start_of = |i: usize| t0 + Duration::from_secs_f64(sc.faults[i].at_secs);
        loop {
            let next_start = pending.front().map(|i| start_of(*i));
            let next_heal = (0..active.len()).min_by_key(|k| active[*k].heal_at);
            // A heal due at the same moment as a start goes first: the faults do not overlap.
            let heal_now = match (next_heal, next_start) {
                (Some(k), Some(s)) => (active[k].heal_at <= s).then_some(k),
                (Some(k), None) => Some(k),
                (None, _) => None,
            };
            if let Some(k) = heal_now {
                sleep_until(active[k].heal_at).await;
                let a = active.swap_remove(k);
                let next = next_event(&active, pending.front().map(|i| start_of(*i)));
                let r = heal_fault(a, &mut cluster, &topo, &wan, t0, next).await?;
                eprintln!(
                    "--- fault {} {} on node {} healed: leader before {:?}, new leader {:?} \
                     after {:?} ms ({})",
                    r.index,
                    r.kind,
                    r.target,
                    r.leader_before,
                    r.new_leader,
                    r.election_ms,
                    r.detail
                );
                faults.push(r);
                continue;
            }
            let Some(i) = pending.pop_front() else {
                break;
            };
            let f = sc.faults[i].clone();
            sleep_until(start_of(i)).await;
            let drop_https = sc.debug.drop_majority_https;
            let busy: BTreeSet<u64> = active.iter().flat_map(|a| a.busy.iter().copied()).collect();
            let mut a = start_fault(
                i,
                &f,
                &mut cluster,
                &topo,
                &wan,
                &mut rng,
                t0,
                drop_https,
                &busy,
            )
            .await?;
            eprintln!(
                "--- fault {i} {} on node {} started ({} other fault(s) in force)",
                f.kind.name(),
                a.target,
                active.len()
            );
            // The election is measured until the fault heals or the next scheduled event,
            // whichever comes first, so that overlapping faults still start on time.
            let until = next_event(&active, pending.front().map(|i| start_of(*i)))
                .map_or(a.heal_at, |n| n.min(a.heal_at));
            measure_election(&cluster, &mut a, until).await;
            active.push(a);
        }
        faults.sort_by_key(|r: &FaultReport| (r.at_ms, r.index));
        sleep_until(deadline).await;
        anyhow::Ok(faults)
    };
    let (faults, data_plane_stats) = tokio::join!(schedule, probe);
    let faults = faults?;
    for c in clients {
        let _ = c.await;
    }
    let end_ns = t0.elapsed().as_nanos() as u64;
    eprintln!("--- workload done; checking");

    let mut node_crashes = Vec::new();
    for id in cluster.ids() {
        if let Some(st) = cluster.exited(id) {
            node_crashes.push(format!("node {id} exited on its own: {st}"));
        }
    }

    // Convergence: after healing, every node must hold the same value for every key.
    let keys: Vec<String> = (0..sc.clients.keys).map(workload::key_name).collect();
    let conv_deadline = Instant::now() + Duration::from_secs(30);
    let (converged, convergence_detail, final_state) = loop {
        let (ok, detail, state) = read_everywhere(&cluster, &ids, &keys).await;
        if ok || Instant::now() > conv_deadline {
            break (ok, detail, state);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let events = history.snapshot();
    let check = wgl::check_history(&events);
    let final_check =
        wgl::check_history_with_final_state(&events, &final_state, &CheckOptions::default());
    let counts = count(&events);
    let mut longest = BTreeMap::new();
    for id in &ids {
        longest.insert(*id, history.longest_gap_ms(*id, 0, end_ns));
    }
    let spans: Vec<Span> = faults
        .iter()
        .filter_map(|f| {
            Some(Span {
                fault: f.index,
                kind: f.kind.clone(),
                from_ms: f.at_ms,
                to_ms: f.healed_at_ms,
                majority: f.majority_side.clone()?,
            })
        })
        .collect();
    // A gateway that another, overlapping fault took down (killed, paused, cut off) cannot be
    // expected to serve during a partition; it is not part of that partition's majority side.
    let down: Vec<Down> = faults
        .iter()
        .map(|f| Down {
            fault: f.index,
            from_ms: f.at_ms,
            to_ms: f.healed_at_ms,
            nodes: f.cut_off.clone(),
        })
        .collect();
    let spans = outage::exclude_down(spans, &down);
    let majority_data_plane =
        outage::check(&spans, data_plane_stats.as_ref(), sc.max_majority_outage_ms);
    let linearizable = check.ok;
    let final_state_ok = converged && final_check.ok;
    let healthy = linearizable && final_state_ok && node_crashes.is_empty();
    let passed = match sc.expect {
        Expect::Linearizable => healthy && majority_data_plane.ok,
        // The majority side must keep serving whatever the register checker finds.
        Expect::Violation => !linearizable && majority_data_plane.ok,
        // A measured outage, not merely a window the probe could not check.
        Expect::MajorityOutage => majority_data_plane.outage_seen(),
    };
    let mut check_report = check.report();
    if !converged {
        // Without an agreed state there is nothing meaningful to compare the history with.
        check_report.push_str(&format!(
            "final state: not checked, the nodes did not converge: {convergence_detail}\n"
        ));
    } else if check.ok && !final_check.ok {
        check_report.push_str("final state: ");
        check_report.push_str(&final_check.report());
    }
    let data_plane_probe = match &data_plane {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("missing: setup failed: {e:#}"),
    };
    drop(data_plane);
    cluster.stop_all();
    drop(cluster);
    let wan_stats = wan.stats();
    drop(wan);
    drop(topo);
    let run_dir_s = run_dir.display().to_string();
    if passed && !o.keep {
        // Logs are only interesting when something went wrong.
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(Report {
        scenario: sc.name.clone(),
        file: o.scenario_path.display().to_string(),
        seed: sc.seed,
        nodes: sc.nodes,
        duration_secs: sc.duration_secs,
        expect: sc.expect,
        operations: counts.ok + counts.fail + counts.info,
        ok: counts.ok,
        failed: counts.fail,
        indeterminate: counts.info,
        reads_ok: counts.reads,
        cas_ok_true: counts.cas_true,
        cas_ok_false: counts.cas_false,
        writes_ok: counts.writes,
        faults,
        longest_admin_outage_ms: longest,
        data_plane_probe,
        data_plane: data_plane_stats.unwrap_or_default(),
        majority_data_plane,
        wan: wan_stats,
        linearizable,
        check_report,
        converged,
        convergence_detail,
        final_state_ok,
        final_state,
        node_crashes,
        passed,
        run_dir: run_dir_s,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

/// Starts the WAN link layer (one TUN per node) with the scenario's `[links]` baseline.
fn start_wan(sc: &Scenario) -> anyhow::Result<LinkLayer> {
    let specs = (1..=sc.nodes)
        .map(|id| DeviceSpec {
            id,
            region: sc.regions[((id - 1) as usize) % sc.regions.len()].clone(),
            ns: node_ns(id),
            dev: wan_dev(id),
            ip: wan_ip(id),
        })
        .collect();
    let wan = LinkLayer::start(specs, sc.seed).context("start the WAN link layer")?;
    let l = &sc.links;
    wan.set_inter_region(LinkParams {
        delay_ms: l.delay_ms,
        jitter_ms: l.jitter_ms,
        loss: l.loss_percent / 100.0,
        reorder: l.reorder,
    });
    for p in &l.pair {
        // Validated: exactly two regions.
        if let [a, b] = p.between.as_slice() {
            wan.set_regions(
                a,
                b,
                LinkParams {
                    delay_ms: p.delay_ms,
                    jitter_ms: p.jitter_ms,
                    loss: p.loss_percent / 100.0,
                    reorder: p.reorder,
                },
            );
        }
    }
    Ok(wan)
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}

#[derive(Default)]
struct Counts {
    ok: usize,
    fail: usize,
    info: usize,
    reads: usize,
    writes: usize,
    cas_true: usize,
    cas_false: usize,
}

fn count(events: &[Event]) -> Counts {
    use wgl::OpResult;
    let mut c = Counts::default();
    for e in events {
        if let Event::Complete { outcome, .. } = e {
            match outcome {
                Outcome::Ok(r) => {
                    c.ok += 1;
                    match r {
                        OpResult::Read(_) => c.reads += 1,
                        OpResult::Write => c.writes += 1,
                        OpResult::Cas(true) => c.cas_true += 1,
                        OpResult::Cas(false) => c.cas_false += 1,
                    }
                }
                Outcome::Fail => c.fail += 1,
                Outcome::Info => c.info += 1,
            }
        }
    }
    c
}

/// Reads every key through every node. Returns (all agree, detail, the agreed state).
async fn read_everywhere(
    cluster: &Cluster,
    ids: &[u64],
    keys: &[String],
) -> (bool, String, BTreeMap<String, Option<String>>) {
    let mut state = BTreeMap::new();
    let mut detail = Vec::new();
    let mut ok = true;
    for key in keys {
        let mut vals: BTreeMap<u64, Option<String>> = BTreeMap::new();
        for id in ids {
            let a = &cluster.node(*id).admin;
            let mut c = a.raw();
            let call = c.kv_get(a.request(KvGetRequest { key: key.clone() }));
            match tokio::time::timeout(Duration::from_secs(3), call).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    vals.insert(*id, r.found.then_some(r.value));
                }
                _ => {
                    ok = false;
                    detail.push(format!("{key}: node {id} did not answer"));
                }
            }
        }
        let distinct: BTreeSet<&Option<String>> = vals.values().collect();
        if distinct.len() > 1 {
            ok = false;
            detail.push(format!("{key}: nodes disagree: {vals:?}"));
        }
        if let Some(v) = vals.values().next() {
            state.insert(key.clone(), v.clone());
        }
    }
    let detail = if ok {
        format!("{} keys equal on {} nodes", keys.len(), ids.len())
    } else {
        detail.join("; ")
    };
    (ok, detail, state)
}

/// A fault in force: what [`heal_fault`] needs to undo it and to finish its report.
struct ActiveFault {
    index: usize,
    kind: FaultKind,
    target: u64,
    at_ms: u64,
    heal_at: Instant,
    /// The leader and its term when the fault started.
    before: Option<(u64, u64)>,
    leader_affected: bool,
    /// The nodes that keep contact with each other (where a new leader is expected).
    majority: Vec<u64>,
    cut_off: Vec<u64>,
    /// Nodes that later faults must not pick as their target while this one is in force.
    busy: Vec<u64>,
    majority_side: Option<Vec<u64>>,
    https_dropped: bool,
    /// Link faults: the WAN table entries they changed, as they were before.
    wan_before: HashMap<(u64, u64), LinkParams>,
    ids: Vec<u64>,
    detail: String,
    election_ms: Option<u64>,
    new_leader: Option<u64>,
}

/// The earliest of the other faults' heals and the next scheduled start.
fn next_event(active: &[ActiveFault], next_start: Option<Instant>) -> Option<Instant> {
    active.iter().map(|a| a.heal_at).chain(next_start).min()
}

/// Picks the node fault `index` hits. Nodes in `busy` are already hit by a fault in force: a
/// second fault on them would be undone by the first one's heal (or undo it), so `follower`
/// and `random` avoid them and `leader` refuses them.
fn resolve_target(
    index: usize,
    target: &Target,
    leader: Option<u64>,
    ids: &[u64],
    busy: &BTreeSet<u64>,
    rng: &mut StdRng,
) -> anyhow::Result<u64> {
    let free: Vec<u64> = ids.iter().copied().filter(|i| !busy.contains(i)).collect();
    let t = match target {
        Target::Node(id) => *id,
        Target::Leader => leader.unwrap_or(1),
        // Same draw as before overlaps were allowed, so existing seeds pick the same nodes.
        Target::Random if !free.is_empty() => free[rng.gen_range(0..free.len())],
        Target::Random => bail!("faults[{index}]: every node is already hit by another fault"),
        Target::Follower => {
            let others: Vec<u64> = free
                .iter()
                .copied()
                .filter(|i| Some(*i) != leader)
                .collect();
            match others.choose(rng) {
                Some(t) => *t,
                None => bail!("faults[{index}]: no follower is free of other faults"),
            }
        }
    };
    if busy.contains(&t) {
        bail!(
            "faults[{index}]: target node {t} ({target:?}) is already hit by an overlapping \
             fault; schedule them apart or target another node"
        );
    }
    Ok(t)
}

/// Applies fault `f` (without waiting for its election or its heal). `drop_https`: the
/// test-only `[debug] drop_majority_https` switch. `busy`: nodes hit by faults in force.
#[allow(clippy::too_many_arguments)]
async fn start_fault(
    index: usize,
    f: &super::scenario::Fault,
    cluster: &mut Cluster,
    topo: &Topology,
    wan: &LinkLayer,
    rng: &mut StdRng,
    t0: Instant,
    drop_https: bool,
    busy: &BTreeSet<u64>,
) -> anyhow::Result<ActiveFault> {
    let before = cluster.current_leader().await;
    let leader = before.map(|(l, _)| l);
    let ids = cluster.ids();
    let target = resolve_target(index, &f.target, leader, &ids, busy, rng)?;
    let others: Vec<u64> = ids.iter().copied().filter(|i| *i != target).collect();
    let mut wan_before = HashMap::new();
    let at = Instant::now();
    let at_ms = (at - t0).as_millis() as u64;
    // `cut_off`: the nodes that lose contact with the majority (the old leader among them
    // means an election must happen among the rest, `majority`).
    let (cut_off, detail): (Vec<u64>, String) = match f.kind {
        FaultKind::Kill => {
            cluster.kill(target);
            (vec![target], "SIGKILL".into())
        }
        FaultKind::Pause => {
            cluster.pause(target)?;
            (vec![target], "SIGSTOP".into())
        }
        FaultKind::Isolate => {
            topo.partition(&cut(&[target], &others))?;
            (vec![target], format!("{target} | {others:?}"))
        }
        FaultKind::MajorityMinority => {
            let mut rest = others.clone();
            rest.shuffle(rng);
            let minority_size = (ids.len() - 1) / 2;
            let mut minority = vec![target];
            minority.extend(rest.iter().take(minority_size.saturating_sub(1)));
            let majority: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|i| !minority.contains(i))
                .collect();
            topo.partition(&cut(&minority, &majority))?;
            (
                minority.clone(),
                format!("minority {minority:?} | majority {majority:?}"),
            )
        }
        FaultKind::OneWay => {
            let blocked = others.iter().map(|o| (*o, target)).collect();
            topo.partition(&blocked)?;
            // The target still reaches the others; whether it loses leadership is up to Raft.
            (vec![target], format!("{others:?} -> {target} dropped"))
        }
        FaultKind::Bridge => {
            let mut rest = others.clone();
            rest.shuffle(rng);
            let half = rest.len() / 2;
            let (a, b) = rest.split_at(half);
            let mut blocked = cut(a, b);
            blocked.extend(cut(b, a));
            topo.partition(&blocked)?;
            // Only the halves are cut from each other; the bridge (target) sees everyone, so
            // no node loses contact with a majority and no election is required.
            (Vec::new(), format!("{a:?} | {b:?} bridged by {target}"))
        }
        FaultKind::LinkDown => {
            topo.set_link(target, false)?;
            (vec![target], "eth0 down".into())
        }
        FaultKind::Membership => {
            cluster.membership(Membership::Remove, target).await?;
            (vec![target], "removed".into())
        }
        FaultKind::Latency | FaultKind::Loss => {
            let (a, b) = match f.between.as_deref() {
                Some([a, b]) => (a.as_str(), b.as_str()),
                _ => bail!("faults[{index}]: between needs two regions"),
            };
            // Keep the other parameter of the pair at its baseline.
            let base = cluster
                .nodes
                .iter()
                .filter(|x| x.region == a)
                .flat_map(|x| {
                    cluster
                        .nodes
                        .iter()
                        .filter(move |y| y.region == b && y.id != x.id)
                        .map(move |y| (x.id, y.id))
                })
                .next()
                .map(|(x, y)| wan.params(x, y))
                .unwrap_or_default();
            // Only this pair's entries come back on heal, so that an overlapping link fault on
            // another region pair stays in force.
            let region = |id: u64| cluster.node(id).region.as_str();
            wan_before = wan
                .snapshot()
                .into_iter()
                .filter(|((x, y), _)| {
                    let (rx, ry) = (region(*x), region(*y));
                    (rx == a && ry == b) || (rx == b && ry == a)
                })
                .collect();
            let p = if f.kind == FaultKind::Latency {
                LinkParams {
                    delay_ms: f.delay_ms.unwrap_or(0),
                    jitter_ms: f.jitter_ms.unwrap_or(0),
                    loss: base.loss,
                    reorder: base.reorder,
                }
            } else {
                LinkParams {
                    loss: f.percent.unwrap_or(0.0) / 100.0,
                    ..base
                }
            };
            wan.set_regions(a, b, p);
            // Nobody is cut off; an election may still happen (a slow link to the leader), and
            // the report shows it through the admin-plane outages and the workload.
            (
                Vec::new(),
                format!(
                    "{a} <-> {b}: delay {} ms, jitter {} ms, loss {}%",
                    p.delay_ms,
                    p.jitter_ms,
                    p.loss * 100.0
                ),
            )
        }
        FaultKind::DiskFull => {
            let n = cluster.fill_disk(target)?;
            // The node keeps running (or crashes, which the report shows); whether it keeps
            // leading is up to it, so an election is measured like for any cut-off node.
            (vec![target], format!("data dir filled ({} KiB)", n / 1024))
        }
    };
    let leader_affected = leader.is_some_and(|l| cut_off.contains(&l));
    let majority: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|i| !cut_off.contains(i))
        .collect();
    let majority_side = outage::majority_side(f.kind, &cut_off, &ids);
    let mut detail = detail;
    // The test-only switch: make one majority-side gateway stop serving, so the data-plane
    // check has something to catch.
    let https_dropped = match (&majority_side, drop_https) {
        (Some(side), true) => match side.first() {
            Some(victim) => {
                topo.drop_https(*victim)?;
                detail.push_str(&format!("; TEST: HTTPS to gateway {victim} dropped"));
                true
            }
            None => false,
        },
        _ => false,
    };
    let heal_at = at + Duration::from_secs_f64(f.duration_secs);
    // Down or cut-off nodes, and the target itself (e.g. a bridge node), are off limits for
    // overlapping faults.
    let mut busy_nodes = cut_off.clone();
    if !busy_nodes.contains(&target) {
        busy_nodes.push(target);
    }
    if matches!(f.kind, FaultKind::Latency | FaultKind::Loss) {
        // A link fault hits a region pair, not a node.
        busy_nodes.clear();
    }
    Ok(ActiveFault {
        index,
        kind: f.kind,
        target,
        at_ms,
        heal_at,
        before,
        leader_affected,
        majority,
        cut_off,
        busy: busy_nodes,
        majority_side,
        https_dropped,
        wan_before,
        ids,
        detail,
        election_ms: None,
        new_leader: None,
    })
}

/// Waits (until `until` at the latest) for the election a fault on the leader causes.
async fn measure_election(cluster: &Cluster, a: &mut ActiveFault, until: Instant) {
    if let (true, Some((old, term))) = (a.leader_affected, a.before) {
        if let Some((l, d)) = wait_new_leader(cluster, &a.majority, old, term, until).await {
            a.election_ms = Some(d.as_millis() as u64);
            a.new_leader = Some(l);
        }
    }
}

/// Heals fault `a` and finishes its report. `next_event`: when the next scheduled start or
/// heal is due, bounding how long this waits for the leadership to settle.
async fn heal_fault(
    a: ActiveFault,
    cluster: &mut Cluster,
    topo: &Topology,
    wan: &LinkLayer,
    t0: Instant,
    next_event: Option<Instant>,
) -> anyhow::Result<FaultReport> {
    let ActiveFault {
        index,
        kind,
        target,
        at_ms,
        before,
        leader_affected,
        cut_off,
        majority_side,
        https_dropped,
        wan_before,
        ids,
        mut detail,
        election_ms,
        new_leader,
        ..
    } = a;
    let leader = before.map(|(l, _)| l);
    if https_dropped {
        topo.undrop_https()?;
    }
    match kind {
        FaultKind::Kill => cluster.spawn(target)?,
        FaultKind::Pause => cluster.resume(target)?,
        FaultKind::Isolate
        | FaultKind::MajorityMinority
        | FaultKind::OneWay
        | FaultKind::Bridge => topo.heal()?,
        FaultKind::LinkDown => topo.set_link(target, true)?,
        FaultKind::DiskFull => cluster.free_disk(target)?,
        FaultKind::Latency | FaultKind::Loss => {
            let mut table = wan.snapshot();
            table.extend(wan_before);
            wan.restore(table);
            // No node was cut off, so no election is expected; report one if it happened. A
            // follower that missed heartbeats may still be a leaderless candidate in a higher
            // term at this point and only disrupt the leader once its votes get through, so
            // wait (bounded, and not past the next scheduled event) until all nodes agree on a
            // leader, and compare the highest term any node reports, candidates included.
            let settle = Instant::now() + Duration::from_secs(3);
            let settle = next_event.map_or(settle, |n| n.min(settle));
            while cluster.agreed_leader(&ids).await.is_none() && Instant::now() < settle {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let after = cluster.current_leader().await;
            let term_after = max_term(cluster).await;
            match (before, after, term_after) {
                (Some((l0, term0)), Some((l1, _)), Some(term1)) if term1 != term0 => detail
                    .push_str(&format!(
                        "; elections: term {term0} -> {term1}, leader {l0} -> {l1}"
                    )),
                (Some((l0, term0)), Some(_), Some(_)) => {
                    detail.push_str(&format!("; no election (leader {l0}, term {term0})"))
                }
                _ => detail.push_str("; leader unknown at start or end"),
            }
        }
        FaultKind::Membership => {
            cluster.membership(Membership::AddLearner, target).await?;
            cluster.membership(Membership::Promote, target).await?;
            detail.push_str(", re-added as learner, promoted");
        }
    }
    Ok(FaultReport {
        index,
        kind: kind.name().into(),
        target,
        at_ms,
        healed_at_ms: (Instant::now() - t0).as_millis() as u64,
        leader_before: leader,
        leader_affected,
        election_ms,
        new_leader,
        majority_side,
        cut_off,
        detail,
    })
}

/// The highest term any running node reports (a candidate's too), or `None` if none answers.
async fn max_term(cluster: &Cluster) -> Option<u64> {
    let mut best = None;
    for n in &cluster.nodes {
        if n.paused || n.child.is_none() {
            continue;
        }
        if let Some(s) = n.admin.status(Duration::from_millis(300)).await {
            best = best.max(Some(s.term));
        }
    }
    best
}

/// Every pair (a, b) and (b, a): `a` and `b` cannot talk at all.
fn cut(a: &[u64], b: &[u64]) -> BTreeSet<(u64, u64)> {
    let mut s = BTreeSet::new();
    for x in a {
        for y in b {
            s.insert((*x, *y));
            s.insert((*y, *x));
        }
    }
    s
}

/// Polls the `majority` nodes until one reports a leader other than `old` in a later term.
async fn wait_new_leader(
    cluster: &Cluster,
    majority: &[u64],
    old: u64,
    old_term: u64,
    until: Instant,
) -> Option<(u64, Duration)> {
    let start = Instant::now();
    while Instant::now() < until {
        for id in majority {
            if let Some(s) = cluster
                .node(*id)
                .admin
                .status(Duration::from_millis(200))
                .await
            {
                if s.leader_id != 0 && s.leader_id != old && s.term > old_term {
                    return Some((s.leader_id, start.elapsed()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The summary table printed after a run.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "scenario {} (seed {}, {} nodes, {} s)\n",
        r.scenario, r.seed, r.nodes, r.duration_secs
    ));
    s.push_str(&format!(
        "  {:<28} {}\n  {:<28} {} (reads {}, writes {}, cas ok {}, cas refused {})\n  {:<28} {}\n  {:<28} {}\n",
        "operations", r.operations, "ok", r.ok, r.reads_ok, r.writes_ok, r.cas_ok_true,
        r.cas_ok_false, "failed (definite)", r.failed, "indeterminate", r.indeterminate
    ));
    s.push_str("  faults:\n");
    s.push_str(&format!(
        "    {:>3} {:<18} {:>6} {:>8} {:>8} {:>12} {:>10}\n",
        "#", "kind", "target", "at ms", "leader", "election ms", "new leader"
    ));
    for f in &r.faults {
        s.push_str(&format!(
            "    {:>3} {:<18} {:>6} {:>8} {:>8} {:>12} {:>10}\n",
            f.index,
            f.kind,
            f.target,
            f.at_ms,
            f.leader_before.map(|l| l.to_string()).unwrap_or("-".into()),
            match (f.leader_affected, f.election_ms) {
                (false, _) => "n/a".to_string(),
                (true, Some(ms)) => ms.to_string(),
                (true, None) => "none".to_string(),
            },
            f.new_leader.map(|l| l.to_string()).unwrap_or("-".into()),
        ));
        if matches!(f.kind.as_str(), "latency" | "loss") {
            s.push_str(&format!("        {}\n", f.detail));
        }
    }
    s.push_str("  longest admin-plane outage per node (ms): ");
    let o: Vec<String> = r
        .longest_admin_outage_ms
        .iter()
        .map(|(n, ms)| format!("n{n}={ms}"))
        .collect();
    s.push_str(&o.join(" "));
    s.push('\n');
    s.push_str(&format!(
        "  WAN link layer: {} forwarded, {} lost (loss), {} queue-full, {} write errors, {} reordered\n",
        r.wan.forwarded, r.wan.lost, r.wan.queue_full, r.wan.write_errors, r.wan.reordered
    ));
    s.push_str(&format!("  data-plane probe: {}\n", r.data_plane_probe));
    for (id, g) in &r.data_plane {
        s.push_str(&format!(
            "    gateway {id}: {} requests, {} errors ({:.1}%), longest outage {} ms\n",
            g.requests,
            g.errors,
            g.error_rate * 100.0,
            g.longest_outage_ms
        ));
    }
    s.push_str(&majority_summary(&r.majority_data_plane));
    s.push_str(&format!(
        "  linearizable: {}\n  converged: {} ({})\n  no acknowledged write lost: {}\n",
        r.linearizable,
        r.converged,
        r.convergence_detail,
        if r.converged {
            r.final_state_ok.to_string()
        } else {
            "not checked (no converged state)".to_string()
        }
    ));
    for c in &r.node_crashes {
        s.push_str(&format!("  CRASH: {c}\n"));
    }
    if !r.linearizable || !r.final_state_ok {
        s.push_str(&r.check_report);
    }
    s.push_str(&format!(
        "  expected: {:?} -> {}\n",
        r.expect,
        if r.passed { "PASS" } else { "FAIL" }
    ));
    s
}

/// The majority-side data-plane lines of the summary: one per partition window, the worst per
/// gateway, and every broken limit.
fn majority_summary(m: &MajorityDataPlane) -> String {
    let mut s = format!(
        "  majority-side data plane during partitions (limit {} ms, max_majority_outage_ms):\n",
        m.max_outage_ms
    );
    if m.windows.is_empty() {
        s.push_str("    no partition faults\n");
    }
    for w in &m.windows {
        let g: Vec<String> = w
            .gateways
            .iter()
            .map(|(id, g)| {
                format!(
                    "n{id}={} ms ({}/{} errors)",
                    g.longest_outage_ms, g.errors, g.requests
                )
            })
            .collect();
        s.push_str(&format!(
            "    fault {:>2} {:<18} {:<17} majority {:?}: {} {}\n",
            w.fault,
            w.kind,
            format!("{}..{} ms", w.from_ms, w.to_ms),
            w.majority,
            if g.is_empty() {
                "not probed".to_string()
            } else {
                g.join(" ")
            },
            if w.ok { "ok" } else { "OUTAGE" }
        ));
    }
    if !m.longest_outage_ms.is_empty() {
        let o: Vec<String> = m
            .longest_outage_ms
            .iter()
            .map(|(n, ms)| format!("n{n}={ms}"))
            .collect();
        s.push_str(&format!(
            "    longest majority-side outage per gateway during partitions (ms): {}\n",
            o.join(" ")
        ));
    }
    for v in &m.violations {
        s.push_str(&format!("  MAJORITY-SIDE DATA-PLANE OUTAGE: {v}\n"));
    }
    s.push_str(&format!(
        "  majority side kept serving: {}\n",
        if m.ok { "yes" } else { "NO" }
    ));
    s
}

/// Writes the JSON report.
pub fn write_report(r: &Report, path: &Path) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(r)?;
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}
