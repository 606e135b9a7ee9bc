//! Data-plane worker threads.
//!
//! Each worker is an OS thread with its own single-threaded tokio runtime, accepting from the
//! shared HTTPS listener, as nginx's worker processes and HAProxy's threads do. A connection
//! is served to the end by the worker that accepted it, and so are the pooled backend
//! connections its requests use (`Proxy` keeps one pool per worker). A request then never
//! crosses threads: on the node's work-stealing runtime the client connection, the backend
//! connection's task and the waker between them could each run on another core.
//!
//! Every worker holds a duplicate of the listening socket in its own epoll set. A new
//! connection wakes each idle worker; one accepts it and the others see `WouldBlock`, which
//! costs a wake-up per connection and nothing per request.
//!
//! Whichever worker wakes first accepts, and one that wakes on a burst accepts all of it: with
//! 32 long-lived connections, one worker served 60 % of them and its clients waited longer.
//! So a worker that already serves more connections than another hands a newly accepted one
//! to the least loaded worker (`Seat::place`), as HAProxy's threads do; it costs a channel
//! message and a re-registration per connection moved, and nothing per request.
//!
//! Workers may be pinned, one per CPU ([`cpus`]). Unpinned on a busy 2-core machine, the
//! kernel's placement cost HTTP/1.1 keep-alive a 1.5–3.4 ms p99 where pinned workers gave
//! 1.2–1.5 ms (docs/benchmarks.md).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

/// How many more connections than the least loaded worker one may serve before it hands new
/// ones over: moving a connection for a difference of one would only trade places.
const SLACK: usize = 1;

/// Every worker's open connections, and the way to hand one a connection.
struct Spread {
    open: Vec<AtomicUsize>,
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
}

struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    load: Load,
}

/// One open connection counted against the worker serving it, until dropped.
pub struct Load {
    spread: Arc<Spread>,
    worker: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.spread.open[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks a worker's slot as gone: it takes no hand-offs, and is left out of the least loaded.
const GONE: usize = usize::MAX / 2;

/// The worker to serve a new connection: `me` unless another serves more than `SLACK` fewer.
/// Slots at or above [`GONE`] belong to workers that have stopped.
fn pick(open: impl Iterator<Item = usize>, me: usize) -> usize {
    let mut mine = 0;
    let mut least = (me, usize::MAX);
    for (i, n) in open.enumerate() {
        if i == me {
            mine = n;
        }
        if n < least.1 {
            least = (i, n);
        }
    }
    if least.1 < GONE && mine > least.1 + SLACK {
        least.0
    } else {
        me
    }
}

/// A worker's place among the others: where its accepted connections go, and the
/// connections the others hand it.
pub struct Seat {
    me: usize,
    spread: Arc<Spread>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
}

impl Seat {
    /// Serves a connection accepted here on this worker, counted, or hands it to a less
    /// loaded one (`None`).
    pub fn place(
        &self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> Option<(tokio::net::TcpStream, Load)> {
        let open = self.spread.open.iter().map(|n| n.load(Ordering::Relaxed));
        let to = pick(open, self.me);
        let load = self.count(to);
        if to == self.me {
            return Some((stream, load));
        }
        // Out of this worker's epoll set, into the other's (`handed`).
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "connection lost while handing it over");
                return None;
            }
        };
        let Err(back) = self.spread.inboxes[to].send(Handoff { stream, peer, load }) else {
            return None;
        };
        // That worker stopped between the pick and the send: serve it here after all.
        let Handoff { stream, .. } = back.0;
        tokio::net::TcpStream::from_std(stream)
            .ok()
            .map(|s| (s, self.count(self.me)))
    }

    /// The next connection another worker handed to this one.
    pub async fn handed(&mut self) -> (tokio::net::TcpStream, SocketAddr, Load) {
        loop {
            // The shared `Spread` holds every sender, so the inbox never closes while this
            // seat exists; `None` cannot come, and waiting on is the safe answer if it did.
            let Some(h) = self.inbox.recv().await else {
                return std::future::pending().await;
            };
            match tokio::net::TcpStream::from_std(h.stream) {
                Ok(s) => return (s, h.peer, h.load),
                Err(e) => tracing::debug!(error = %e, "handed connection not registered"),
            }
        }
    }

    fn count(&self, worker: usize) -> Load {
        self.spread.open[worker].fetch_add(1, Ordering::Relaxed);
        Load {
            spread: self.spread.clone(),
            worker,
        }
    }
}

/// Marks its worker's slot [`GONE`] when the worker's thread ends, however it ends, so that
/// the others stop offering it connections.
struct Gone {
    spread: Arc<Spread>,
    worker: usize,
}

impl Drop for Gone {
    fn drop(&mut self) {
        // Any `Load` still counted here subtracts from GONE later; it stays far above any
        // real count.
        self.spread.open[self.worker].fetch_add(GONE, Ordering::Relaxed);
    }
}

/// The CPU for each of `count` workers, from the CPUs this process may run on (`allowed`):
/// the `i`-th allowed CPU for worker `i`. `pin`: `Some(true)` always (wrapping around when
/// there are more workers than CPUs), `Some(false)` never, `None` when there is exactly one
/// worker per allowed CPU. Fewer workers than CPUs would leave the kernel free to use the rest
/// for them; more would pin two to one core for good.
fn assign(allowed: &[usize], count: usize, pin: Option<bool>) -> Option<Vec<usize>> {
    let pin = pin.unwrap_or(allowed.len() == count);
    if !pin || allowed.is_empty() {
        return None;
    }
    Some((0..count).map(|i| allowed[i % allowed.len()]).collect())
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> nix::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// The CPU each of `count` workers is pinned to, if any; see [`assign`].
pub fn cpus(count: usize, pin: Option<bool>) -> Option<Vec<usize>> {
    if pin == Some(false) {
        return None;
    }
    match allowed_cpus() {
        Ok(allowed) => assign(&allowed, count, pin),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the CPUs this node may use; workers not pinned");
            None
        }
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The calling thread's worker slot: `1 + i` on worker `i`, 0 on any other thread.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Starts `count` workers, each running `serve(listener, tracker, seat)` on its own duplicate
/// of `listener` (non-blocking), with a tracker for the connection tasks it spawns and its
/// seat for spreading connections; worker `i` is pinned to `cpus[i]` if given. A worker ends
/// once `serve` returns and those tasks have finished; `node_tracker` waits for every worker.
/// An error means some workers (perhaps none) were started.
pub fn spawn<F, Fut>(
    count: usize,
    listener: &std::net::TcpListener,
    node_tracker: &TaskTracker,
    cpus: Option<&[usize]>,
    serve: F,
) -> io::Result<()>
where
    F: Fn(tokio::net::TcpListener, TaskTracker, Seat) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ()>,
{
    let (inboxes, mut receivers): (Vec<_>, Vec<_>) =
        (0..count).map(|_| mpsc::unbounded_channel()).unzip();
    let spread = Arc::new(Spread {
        open: (0..count).map(|_| AtomicUsize::new(0)).collect(),
        inboxes,
    });
    for (i, inbox) in receivers.drain(..).enumerate() {
        let seat = Seat {
            me: i,
            spread: spread.clone(),
            inbox,
        };
        let dup = listener.try_clone()?;
        let serve = serve.clone();
        let token = node_tracker.token();
        let cpu = cpus.and_then(|c| c.get(i).copied());
        std::thread::Builder::new()
            .name(format!("edge-worker-{i}"))
            .spawn(move || {
                WORKER.with(|w| w.set(1 + i));
                if let Some(cpu) = cpu {
                    if let Err(e) = pin_to(cpu) {
                        tracing::warn!(worker = i, cpu, error = %e, "data-plane worker not pinned");
                    }
                }
                let _gone = Gone {
                    spread: seat.spread.clone(),
                    worker: i,
                };
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(worker = i, error = %e, "data-plane worker has no runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    // Registration must happen on this worker's own event loop.
                    let listener = match tokio::net::TcpListener::from_std(dup) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(worker = i, error = %e, "data-plane worker cannot listen");
                            return;
                        }
                    };
                    let conns = TaskTracker::new();
                    serve(listener, conns.clone(), seat).await;
                    conns.close();
                    conns.wait().await;
                });
                drop(token);
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A non-blocking loopback listener, its address, a node tracker and a shutdown token.
    fn setup() -> (
        std::net::TcpListener,
        SocketAddr,
        TaskTracker,
        CancellationToken,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("local address");
        (listener, addr, TaskTracker::new(), CancellationToken::new())
    }

    /// Every worker accepts from the one listener, knows its slot, and the node's tracker
    /// waits for all of them to finish after shutdown.
    #[tokio::test]
    async fn workers_share_the_listener_and_drain_on_shutdown() {
        let (listener, addr, node, shutdown) = setup();
        let sd = shutdown.clone();
        let serve = move |l: tokio::net::TcpListener, conns: TaskTracker, _seat: Seat| {
            let sd = sd.clone();
            async move {
                loop {
                    let (mut s, _) = tokio::select! {
                        _ = sd.cancelled() => return,
                        r = l.accept() => r.expect("accept"),
                    };
                    conns.spawn(async move {
                        // Each connection is held until the client hangs up, so that a busy
                        // worker leaves the next accept to another one.
                        let _ = s.write_all(&[current() as u8]).await;
                        let _ = s.read(&mut [0u8; 1]).await;
                    });
                }
            }
        };
        spawn(2, &listener, &node, None, serve).expect("spawn workers");
        assert_eq!(current(), 0, "the test's own thread is no worker");

        let mut seen = BTreeSet::new();
        let mut open = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only workers {seen:?} accepted"
            );
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.expect("worker slot");
            seen.insert(b[0]);
            open.push(c);
        }
        assert_eq!(seen, BTreeSet::from([1, 2]));

        node.close();
        shutdown.cancel();
        // Open connections keep their workers alive ...
        assert!(
            tokio::time::timeout(Duration::from_millis(200), node.wait())
                .await
                .is_err(),
            "workers ended while connections were open"
        );
        // ... until they close.
        drop(open);
        tokio::time::timeout(Duration::from_secs(10), node.wait())
            .await
            .expect("workers did not finish after their connections closed");
    }

    #[test]
    fn a_worker_keeps_its_connection_unless_another_serves_fewer_by_more_than_the_slack() {
        let pick = |open: &[usize], me| pick(open.iter().copied(), me);
        assert_eq!(pick(&[0, 0], 0), 0);
        assert_eq!(pick(&[1, 0], 0), 0);
        assert_eq!(pick(&[2, 0], 0), 1);
        assert_eq!(pick(&[5, 3, 1], 1), 2);
        assert_eq!(pick(&[5, 3, 1], 2), 2);
        assert_eq!(pick(&[], 0), 0);
    }

    #[test]
    fn workers_are_pinned_one_per_allowed_cpu_by_default() {
        // One per CPU, in the order of the allowed set (which need not start at 0).
        assert_eq!(assign(&[2, 3], 2, None), Some(vec![2, 3]));
        // Fewer or more workers than CPUs: left to the kernel unless asked.
        assert_eq!(assign(&[0, 1, 2, 3], 2, None), None);
        assert_eq!(assign(&[0, 1], 3, None), None);
        assert_eq!(assign(&[0, 1], 3, Some(true)), Some(vec![0, 1, 0]));
        assert_eq!(assign(&[0, 1], 2, Some(false)), None);
        assert_eq!(assign(&[], 1, Some(true)), None);
    }

    /// Each pinned worker runs on its one CPU only, as the kernel reports it.
    #[tokio::test]
    async fn a_pinned_worker_runs_on_its_cpu_only() {
        let allowed = allowed_cpus().expect("affinity");
        let cpus = assign(&allowed, 2, Some(true)).expect("pinned");
        let (listener, _addr, node, _shutdown) = setup();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let serve = move |_l: tokio::net::TcpListener, _conns: TaskTracker, _seat: Seat| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((current(), allowed_cpus().expect("affinity")));
            }
        };
        spawn(2, &listener, &node, Some(&cpus), serve).expect("spawn workers");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("worker reported")
                .expect("channel open");
            seen.push(got);
        }
        seen.sort();
        assert_eq!(seen, vec![(1, vec![cpus[0]]), (2, vec![cpus[1]])]);
        assert_eq!(
            allowed_cpus().expect("affinity"),
            allowed,
            "pinning a worker left the spawning thread as it was"
        );
        node.close();
        tokio::time::timeout(Duration::from_secs(10), node.wait())
            .await
            .expect("workers finished");
    }

    #[test]
    fn a_stopped_worker_is_offered_nothing() {
        let pick = |open: &[usize], me| pick(open.iter().copied(), me);
        assert_eq!(pick(&[9, GONE], 0), 0);
        assert_eq!(pick(&[9, GONE, 2], 0), 2);
        // Connections it still served when it stopped keep it far above any real count.
        assert_eq!(pick(&[9, GONE + 4], 0), 0);
    }

    /// Connections held open end up spread over the workers, whichever of them accepts:
    /// counted by the worker slot each serving worker writes back.
    #[tokio::test]
    async fn held_connections_are_spread_over_the_workers() {
        let (listener, addr, node, shutdown) = setup();
        let sd = shutdown.clone();
        let serve = move |l: tokio::net::TcpListener, conns: TaskTracker, mut seat: Seat| {
            let sd = sd.clone();
            async move {
                loop {
                    let (mut s, load) = tokio::select! {
                        _ = sd.cancelled() => return,
                        r = l.accept() => {
                            let (s, peer) = r.expect("accept");
                            match seat.place(s, peer) {
                                Some(x) => x,
                                None => continue,
                            }
                        }
                        (s, _, load) = seat.handed() => (s, load),
                    };
                    conns.spawn(async move {
                        let _load = load;
                        let _ = s.write_all(&[current() as u8]).await;
                        let _ = s.read(&mut [0u8; 1]).await;
                    });
                }
            }
        };
        spawn(2, &listener, &node, None, serve).expect("spawn workers");
        // Connected in bursts of four, as a load generator opens its connections.
        let mut open = Vec::new();
        let mut served = [0usize; 3];
        for _ in 0..4 {
            let burst: Vec<_> = (0..4)
                .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
                .collect();
            for c in burst {
                let mut c = c.await.expect("task").expect("connect");
                let mut b = [0u8; 1];
                tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut b))
                    .await
                    .expect("served in time")
                    .expect("worker slot");
                served[b[0] as usize] += 1;
                open.push(c);
            }
        }
        assert_eq!(served[0], 0, "served off the workers");
        assert!(
            served[1].abs_diff(served[2]) <= 2,
            "16 connections served {} and {}",
            served[1],
            served[2]
        );
        node.close();
        shutdown.cancel();
        drop(open);
        tokio::time::timeout(Duration::from_secs(10), node.wait())
            .await
            .expect("workers did not finish after their connections closed");
    }
}
