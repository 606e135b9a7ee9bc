//! Concurrent clients doing compare-and-set and reads on a few registers through random nodes,
//! recording every operation as invoke/complete for the linearizability checker.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_proto::admin::{KvCasRequest, KvGetRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::Admin;
use super::scenario::Clients;
use super::wgl::{Event, Op, OpResult, Outcome};

/// The shared history. Events are appended under one lock with timestamps from one clock, so
/// the slice order is the real-time order the checker needs.
#[derive(Clone)]
pub struct History {
    start: Instant,
    events: Arc<Mutex<Vec<Event>>>,
    /// (node id, completion time) of every operation a node answered, for per-node outages.
    served: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl History {
    pub fn new(start: Instant) -> History {
        History {
            start,
            events: Arc::new(Mutex::new(Vec::new())),
            served: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn push(&self, f: impl FnOnce(u64) -> Event) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let t = self.start.elapsed().as_nanos() as u64;
        ev.push(f(t));
    }

    fn served_by(&self, node: u64) {
        let t = self.start.elapsed().as_nanos() as u64;
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((node, t));
    }

    /// Per node, the longest time (ms) between `from_ns` and `to_ns` in which it answered no
    /// operation: the node's longest admin-plane outage as clients saw it.
    pub fn longest_gap_ms(&self, node: u64, from_ns: u64, to_ns: u64) -> u64 {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let mut prev = from_ns;
        let mut longest = 0;
        for (_, t) in served.iter().filter(|(n, _)| *n == node) {
            longest = longest.max(t.saturating_sub(prev));
            prev = *t;
        }
        longest = longest.max(to_ns.saturating_sub(prev));
        longest / 1_000_000
    }

    pub fn snapshot(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub fn key_name(i: u64) -> String {
    format!("chaos-k{i}")
}

/// Runs one client process until `deadline`, each operation through a random node of `nodes`
/// (all configured nodes: the faults decide which of them answer).
pub async fn client(
    process: u64,
    cfg: Clients,
    seed: u64,
    nodes: Vec<(u64, Admin)>,
    history: History,
    deadline: Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (process.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let timeout = Duration::from_millis(cfg.op_timeout_ms);
    // The last value this client saw per key: a CAS expecting it succeeds when nobody else
    // wrote in between, which keeps the success rate (and the checker's work) interesting.
    let mut seen: Vec<Option<String>> = vec![None; cfg.keys as usize];
    let mut n = 0u64;
    while Instant::now() < deadline {
        let k = rng.gen_range(0..cfg.keys);
        let key = key_name(k);
        let (node_id, node) = &nodes[rng.gen_range(0..nodes.len())];
        let mut c = node.raw();
        if rng.gen_bool(cfg.read_ratio) {
            history.push(|t| Event::invoke(t, process, Op::Read { key: key.clone() }));
            let call = c.kv_get(node.request(KvGetRequest { key: key.clone() }));
            let outcome = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    let v = r.found.then_some(r.value);
                    seen[k as usize] = v.clone();
                    history.served_by(*node_id);
                    Outcome::Ok(OpResult::Read(v))
                }
                // A read that failed changed nothing; the checker drops it either way.
                _ => Outcome::Fail,
            };
            history.push(|t| Event::complete(t, process, outcome));
        } else {
            n += 1;
            let value = format!("p{process}-{n}");
            let expect = if rng.gen_bool(cfg.blind_write_ratio) {
                None
            } else {
                // Without a known value, expect one that may exist: someone's earlier write.
                Some(seen[k as usize].clone().unwrap_or_else(|| "p0-0".into()))
            };
            let op = match &expect {
                None => Op::Write {
                    key: key.clone(),
                    value: value.clone(),
                },
                Some(e) => Op::Cas {
                    key: key.clone(),
                    expect: e.clone(),
                    new: value.clone(),
                },
            };
            history.push(|t| Event::invoke(t, process, op));
            let call = c.kv_cas(node.request(KvCasRequest {
                key: key.clone(),
                expect: expect.clone(),
                value: value.clone(),
            }));
            let outcome = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    history.served_by(*node_id);
                    match (&expect, r.ok) {
                        (None, _) => {
                            seen[k as usize] = Some(value);
                            Outcome::Ok(OpResult::Write)
                        }
                        (Some(_), true) => {
                            seen[k as usize] = Some(value);
                            Outcome::Ok(OpResult::Cas(true))
                        }
                        // ok = false: the compare failed, a definite no.
                        (Some(_), false) => Outcome::Ok(OpResult::Cas(false)),
                    }
                }
                // An error may come after the write was proposed (leader lost mid-commit), and
                // a timeout says nothing: both are indeterminate.
                Ok(Err(_)) | Err(_) => Outcome::Info,
            };
            history.push(|t| Event::complete(t, process, outcome));
        }
        if cfg.think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(cfg.think_ms)).await;
        }
    }
}
