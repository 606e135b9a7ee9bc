//! A user-space "WAN" between the gateway namespaces: one TUN device per node, owned by the
//! harness, with per-link one-way delay, jitter and loss applied in this process.
//!
//! `tc netem` is not available on the kernels we run on, so the harness does what netem would:
//! every node gets a TUN device (IFF_TUN | IFF_NO_PI) created here in the root namespace, moved
//! into the node's namespace with `ip link set DEV netns NS` and given an address on the WAN
//! subnet (10.99.0.<id>/24). The harness keeps the file descriptor (as wireguard-go does), so
//! every IPv4 packet the node sends to another WAN address comes out of our `recv`:
//!
//! ```text
//!  pcchaos-n1 (wan0 10.99.0.1) --fd--> reader task --(loss? delay+jitter)--> link queue 1->2
//!                                                                             |  sleep until due
//!  pcchaos-n2 (wan0 10.99.0.2) <--fd-- per-link writer task <-----------------+
//! ```
//!
//! Parameters are per directed pair of nodes, set by region pair, and change at run time (the
//! table is behind a `std::sync::Mutex` that is never held across an `.await`). Each directed
//! link has a bounded queue (a full queue drops, like a router buffer). By default a packet never
//! overtakes an earlier one on the same link: with jitter its due time is at least the previous
//! packet's, so jitter delays but does not reorder. With `reorder` each packet keeps its own
//! jittered due time, so packets sent closer together than the jitter arrive out of order, as
//! with netem's jitter. Partitions are not handled here: nftables
//! input drops in the node namespaces see the packets we write like any other incoming packet.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::topology::sh;

/// Packets queued per directed link before new ones are dropped. At 1400-byte packets this is
/// ~5.6 MB per link: far above what Raft sends within a few hundred ms, small enough that a
/// node that stops reading cannot grow the harness without bound.
const LINK_QUEUE: usize = 4096;
/// Largest packet we read; the TUN MTU is 1500.
const MAX_PACKET: usize = 65_535;

/// One direction of one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LinkParams {
    /// One-way delay.
    pub delay_ms: u64,
    /// Each packet's delay is uniform in `delay_ms ± jitter_ms` (never below 0).
    pub jitter_ms: u64,
    /// Probability (0..=1) that a packet is dropped.
    pub loss: f64,
    /// Let jitter reorder packets (each is delivered at its own due time) instead of keeping
    /// the link first-in first-out.
    pub reorder: bool,
}

/// One node's end of the WAN.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub id: u64,
    pub region: String,
    /// Namespace the device is moved into.
    pub ns: String,
    /// Interface name (at most 15 bytes; unique in the root namespace while it is created).
    pub dev: String,
    pub ip: Ipv4Addr,
}

/// Counters over the whole run.
#[derive(Debug, Default)]
struct Counters {
    forwarded: AtomicU64,
    lost: AtomicU64,
    queue_full: AtomicU64,
    unroutable: AtomicU64,
    write_errors: AtomicU64,
    reordered: AtomicU64,
}

/// What the link layer did during a run (in the JSON report).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStats {
    pub forwarded: u64,
    /// Dropped by the configured loss.
    pub lost: u64,
    /// Dropped because a link's queue was full.
    pub queue_full: u64,
    /// Not IPv4, or to an address that is not on the WAN.
    pub unroutable: u64,
    /// Writes into a destination device that failed (e.g. its link is down).
    pub write_errors: u64,
    /// Packets scheduled to arrive before one sent earlier on the same link (`reorder`).
    pub reordered: u64,
}

/// A queued packet: when it is due, and its bytes.
/// A packet and the time it is due at the far end.
type Queued = (Instant, Vec<u8>);
/// Per destination index, the queue of the link to it (`None` for the device itself).
type LinkQueues = Vec<Option<mpsc::Sender<Queued>>>;

/// The parameter table: directed (src id, dst id) -> params. Absent pairs have no delay/loss.
type Table = HashMap<(u64, u64), LinkParams>;

/// The running link layer. Dropping it stops every task and closes the TUN file descriptors,
/// which deletes the devices.
pub struct LinkLayer {
    specs: Vec<DeviceSpec>,
    table: Arc<Mutex<Table>>,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for LinkLayer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl LinkLayer {
    /// Creates, moves and configures one TUN device per spec and starts forwarding. Needs root
    /// and a tokio runtime. The namespaces must exist. `seed` drives the loss and jitter draws.
    pub fn start(specs: Vec<DeviceSpec>, seed: u64) -> anyhow::Result<LinkLayer> {
        let mut devices = Vec::new();
        for s in &specs {
            let dev = tun_rs::DeviceBuilder::new()
                .name(&s.dev)
                .mtu(1500)
                .packet_information(false)
                .build_async()
                .with_context(|| format!("create TUN device {}", s.dev))?;
            // Owned by this process from here on: if a later step fails, dropping `dev` closes
            // the fd and the kernel deletes the device, wherever it is.
            sh(&["ip", "link", "set", &s.dev, "netns", &s.ns])?;
            sh(&[
                "ip",
                "-n",
                &s.ns,
                "addr",
                "add",
                &format!("{}/24", s.ip),
                "dev",
                &s.dev,
            ])?;
            sh(&["ip", "-n", &s.ns, "link", "set", &s.dev, "up"])?;
            devices.push(Arc::new(dev));
        }
        let by_ip: Arc<HashMap<Ipv4Addr, usize>> =
            Arc::new(specs.iter().enumerate().map(|(i, s)| (s.ip, i)).collect());
        let table: Arc<Mutex<Table>> = Arc::default();
        let counters: Arc<Counters> = Arc::default();
        let mut tasks = Vec::new();
        // One queue and writer per directed link, so a slow link never delays another.
        let mut senders: Vec<LinkQueues> = Vec::new();
        for (si, _) in specs.iter().enumerate() {
            let mut row = Vec::new();
            for (di, _) in specs.iter().enumerate() {
                if si == di {
                    row.push(None);
                    continue;
                }
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                tasks.push(tokio::spawn(link_writer(
                    rx,
                    devices[di].clone(),
                    counters.clone(),
                )));
                row.push(Some(tx));
            }
            senders.push(row);
        }
        for (si, row) in senders.into_iter().enumerate() {
            tasks.push(tokio::spawn(reader(
                si,
                specs.iter().map(|s| s.id).collect(),
                devices[si].clone(),
                row,
                by_ip.clone(),
                table.clone(),
                counters.clone(),
                // Distinct, reproducible streams per device.
                StdRng::seed_from_u64(
                    seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(si as u64 + 1)),
                ),
            )));
        }
        Ok(LinkLayer {
            specs,
            table,
            counters,
            tasks,
        })
    }

    /// Sets the parameters of every link between a node in region `a` and a node in region `b`,
    /// both directions (for `a == b`, the links inside that region).
    pub fn set_regions(&self, a: &str, b: &str, p: LinkParams) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for x in &self.specs {
            for y in &self.specs {
                if x.id != y.id
                    && ((x.region == a && y.region == b) || (x.region == b && y.region == a))
                {
                    t.insert((x.id, y.id), p);
                }
            }
        }
    }

    /// Parameters of every link between different regions (a baseline).
    pub fn set_inter_region(&self, p: LinkParams) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for x in &self.specs {
            for y in &self.specs {
                if x.region != y.region {
                    t.insert((x.id, y.id), p);
                }
            }
        }
    }

    /// The current parameters of the link from node `src` to node `dst`.
    pub fn params(&self, src: u64, dst: u64) -> LinkParams {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(src, dst))
            .copied()
            .unwrap_or_default()
    }

    /// A copy of the whole table, to restore after a fault.
    pub fn snapshot(&self) -> HashMap<(u64, u64), LinkParams> {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn restore(&self, t: HashMap<(u64, u64), LinkParams>) {
        *self.table.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    pub fn stats(&self) -> LinkStats {
        let c = &self.counters;
        LinkStats {
            forwarded: c.forwarded.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            queue_full: c.queue_full.load(Ordering::Relaxed),
            unroutable: c.unroutable.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            reordered: c.reordered.load(Ordering::Relaxed),
        }
    }
}

/// The destination address of an IPv4 packet, or `None` for anything else (IPv6 router
/// solicitations and the like, truncated packets).
pub fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    let first = *pkt.first()?;
    if first >> 4 != 4 || usize::from(first & 0x0f) * 4 < 20 {
        return None;
    }
    let d: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
    Some(Ipv4Addr::from(d))
}

/// Reads packets from one device and hands each to its link's queue (or drops it).
#[allow(clippy::too_many_arguments)]
async fn reader(
    si: usize,
    ids: Vec<u64>,
    dev: Arc<tun_rs::AsyncDevice>,
    links: LinkQueues,
    by_ip: Arc<HashMap<Ipv4Addr, usize>>,
    table: Arc<Mutex<Table>>,
    counters: Arc<Counters>,
    mut rng: StdRng,
) {
    let mut buf = vec![0u8; MAX_PACKET];
    // Per destination: the latest due time handed out, which a FIFO link's next packet waits for.
    let mut last_due = vec![Instant::now(); links.len()];
    loop {
        let n = match dev.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => {
                // A device that is down can fail reads for a while (link-down fault); the
                // device comes back, so back off instead of spinning or giving up.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let pkt = &buf[..n];
        let Some(di) = ipv4_dst(pkt).and_then(|d| by_ip.get(&d).copied()) else {
            counters.unroutable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(Some(tx)) = links.get(di) else {
            // To its own WAN address: the kernel answers those on loopback, so this is noise.
            counters.unroutable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let p = table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(ids[si], ids[di]))
            .copied()
            .unwrap_or_default();
        if p.loss > 0.0 && rng.gen::<f64>() < p.loss {
            counters.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut delay = p.delay_ms as f64;
        if p.jitter_ms > 0 {
            let j = p.jitter_ms as f64;
            delay = (delay + rng.gen_range(-j..=j)).max(0.0);
        }
        let mut due = Instant::now() + Duration::from_secs_f64(delay / 1000.0);
        if !p.reorder {
            // FIFO: a packet with a smaller jittered delay waits for the one before it.
            due = due.max(last_due[di]);
        } else if due < last_due[di] {
            counters.reordered.fetch_add(1, Ordering::Relaxed);
        }
        last_due[di] = last_due[di].max(due);
        if tx.try_send((due, pkt.to_vec())).is_err() {
            counters.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Delivers one directed link's packets, each at its due time (the reader has already made
/// the due times of a first-in first-out link non-decreasing).
async fn link_writer(
    mut rx: mpsc::Receiver<Queued>,
    dev: Arc<tun_rs::AsyncDevice>,
    counters: Arc<Counters>,
) {
    // Due time, arrival sequence (ties keep arrival order), packet; earliest first.
    let mut due: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let next = due.peek().map(|Reverse((at, _, _))| *at);
        tokio::select! {
            got = rx.recv() => match got {
                Some((at, pkt)) => {
                    seq += 1;
                    due.push(Reverse((at, seq, pkt)));
                }
                None => return,
            },
            () = sleep_until_or_never(next) => {
                if let Some(Reverse((_, _, pkt))) = due.pop() {
                    match dev.send(&pkt).await {
                        Ok(_) => counters.forwarded.fetch_add(1, Ordering::Relaxed),
                        // Destination link down: the packet is lost, as on a real wire.
                        Err(_) => counters.write_errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        }
    }
}

async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `f` on a new thread that has joined network namespace `ns` (`/var/run/netns/<ns>`), so
/// every socket it opens lives there. The rest of the process is not affected (the network
/// namespace is per thread).
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> std::thread::JoinHandle<anyhow::Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        f()
    })
}

/// Runs the future `make()` builds on a current-thread runtime inside namespace `ns` and
/// awaits its result without blocking the caller's runtime.
pub async fn run_in_netns<T, Fut, M>(ns: &str, make: M) -> anyhow::Result<T>
where
    T: Send + 'static,
    Fut: Future<Output = T> + 'static,
    M: FnOnce() -> Fut + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = spawn_in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime in namespace thread")?;
        let out = rt.block_on(make());
        // The receiver may be gone (the run was interrupted); nothing to do then.
        let _ = tx.send(out);
        Ok(())
    });
    match rx.await {
        Ok(out) => Ok(out),
        // The sender was dropped without a result: the thread failed (setns, runtime) or
        // panicked; its join result says which. It has ended, so joining does not block long.
        Err(_) => {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            match joined {
                Ok(Ok(Err(e))) => Err(e.context(format!("thread in namespace {ns}"))),
                _ => Err(anyhow::anyhow!("the thread in namespace {ns} panicked")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_dst_parses_and_rejects() {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 99, 0, 2]);
        assert_eq!(ipv4_dst(&p), Some(Ipv4Addr::new(10, 99, 0, 2)));
        assert_eq!(ipv4_dst(&p[..19]), None, "truncated");
        p[0] = 0x60;
        assert_eq!(ipv4_dst(&p), None, "IPv6");
        assert_eq!(ipv4_dst(&[]), None, "empty");
        p[0] = 0x41;
        assert_eq!(ipv4_dst(&p), None, "IHL below 5");
    }
}
