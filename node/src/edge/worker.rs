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

use std::cell::Cell;
use std::future::Future;
use std::io;

use tokio_util::task::TaskTracker;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The calling thread's worker slot: `1 + i` on worker `i`, 0 on any other thread.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Starts `count` workers, each running `serve(listener, tracker)` on its own duplicate of
/// `listener` (non-blocking), with a tracker for the connection tasks it spawns. A worker ends
/// once `serve` returns and those tasks have finished; `node_tracker` waits for every worker.
/// An error means some workers (perhaps none) were started.
pub fn spawn<F, Fut>(
    count: usize,
    listener: &std::net::TcpListener,
    node_tracker: &TaskTracker,
    serve: F,
) -> io::Result<()>
where
    F: Fn(tokio::net::TcpListener, TaskTracker) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ()>,
{
    for i in 0..count {
        let dup = listener.try_clone()?;
        let serve = serve.clone();
        let token = node_tracker.token();
        std::thread::Builder::new()
            .name(format!("edge-worker-{i}"))
            .spawn(move || {
                WORKER.with(|w| w.set(1 + i));
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
                    serve(listener, conns.clone()).await;
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

    /// Every worker accepts from the one listener, knows its slot, and the node's tracker
    /// waits for all of them to finish after shutdown.
    #[tokio::test]
    async fn workers_share_the_listener_and_drain_on_shutdown() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("local address");
        let node = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let serve = move |l: tokio::net::TcpListener, conns: TaskTracker| {
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
        spawn(2, &listener, &node, serve).expect("spawn workers");
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
}
