//! Connection limits and the bits of bookkeeping the timeouts need.
//!
//! - [`ConnLimiter`]: a node-wide cap (semaphore) and a per-client-IP cap. The per-IP map is a
//!   plain mutex held for a hash-map update only, never across an await.
//! - [`Activity`]: an IO wrapper that stamps the last time bytes moved, so an idle connection can
//!   be told apart from one streaming a long response.
//! - [`Cidrs`]: trusted networks (PROXY protocol senders, `.internal` callers).
//! - `OpenGuard`: the open-connections gauge, held by each connection's task; `CONN_DRAIN`:
//!   how long a closing connection may take.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("node connection limit reached")]
    Node,
    #[error("per-ip connection limit reached for {0}")]
    PerIp(IpAddr),
}

impl LimitError {
    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::Node => "connections_node",
            LimitError::PerIp(_) => "connections_per_ip",
        }
    }
}

pub struct ConnLimiter {
    total: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
}

/// Held for the life of a connection; releases its slots on drop.
pub struct ConnPermit {
    _total: OwnedSemaphorePermit,
    ip: Option<IpAddr>,
    limiter: Arc<ConnLimiter>,
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnLimiter {
            total: Arc::new(Semaphore::new(max_total)),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip,
        })
    }

    /// A node-wide slot; taken before anything is read from the socket.
    pub fn acquire(self: &Arc<Self>) -> Result<ConnPermit, LimitError> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| LimitError::Node)?;
        Ok(ConnPermit {
            _total: permit,
            ip: None,
            limiter: self.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open_for(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip).copied().unwrap_or(0)
    }
}

impl ConnPermit {
    /// Charges the connection to `ip` (the real client, after any PROXY header).
    pub fn charge(&mut self, ip: IpAddr) -> Result<(), LimitError> {
        let mut map = self.limiter.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= self.limiter.max_per_ip {
            return Err(LimitError::PerIp(ip));
        }
        *n += 1;
        self.ip = Some(ip);
        Ok(())
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut map = self.limiter.lock();
            if let Some(n) = map.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// How long a connection that was asked to close may take to finish its in-flight requests.
pub(super) const CONN_DRAIN: Duration = Duration::from_secs(10);

/// Decrements the open-connections gauge when the connection task ends.
pub(super) struct OpenGuard(pub(super) prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Trusted networks.
#[derive(Debug, Clone, Default)]
pub struct Cidrs(Vec<ipnet::IpNet>);

impl Cidrs {
    /// Entries were checked by `EdgeConfig::validate`; anything unparsable is dropped.
    pub fn parse(list: &[String]) -> Self {
        Cidrs(
            list.iter()
                .filter_map(|s| crate::config::parse_cidr(s).ok())
                .collect(),
        )
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// When bytes last moved, as far as the connection's watcher has looked.
///
/// Reads and writes only set a flag: a clock read on each of them was measurable CPU per
/// request. The watcher reads the clock instead, on its tick (`idle_for`), so idleness is
/// known to within one tick.
#[derive(Clone)]
pub struct ActivityClock {
    moved: Arc<AtomicBool>,
    /// The watcher's own: when it last saw the flag set (each clone keeps its own).
    seen: Instant,
}

impl ActivityClock {
    pub fn new() -> Self {
        ActivityClock {
            moved: Arc::new(AtomicBool::new(false)),
            seen: Instant::now(),
        }
    }

    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// How long no byte has moved, counted from the last call that found some had: never
    /// longer than the truth and at most one call interval shorter, so a close comes late,
    /// never early.
    pub fn idle_for(&mut self) -> Duration {
        if self.moved.swap(false, Ordering::Relaxed) {
            self.seen = Instant::now();
        }
        self.seen.elapsed()
    }
}

impl Default for ActivityClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Stamps `clock` whenever bytes move.
pub struct Activity<T> {
    inner: T,
    clock: ActivityClock,
}

impl<T> Activity<T> {
    pub fn new(inner: T, clock: ActivityClock) -> Self {
        clock.touch();
        Activity { inner, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Bytes already read from a socket (PROXY header remainder, ClientHello) replayed ahead of
/// the rest of the stream.
pub struct Rewind<T> {
    prefix: bytes::Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: bytes::Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_limit_releases_on_drop() {
        let l = ConnLimiter::new(10, 2);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        let mut a = l.acquire().expect("a");
        a.charge(ip).expect("a");
        let mut b = l.acquire().expect("b");
        b.charge(ip).expect("b");
        let mut c = l.acquire().expect("c");
        assert_eq!(c.charge(ip), Err(LimitError::PerIp(ip)));
        c.charge(other).expect("other ip is independent");
        drop(a);
        let mut d = l.acquire().expect("d");
        d.charge(ip).expect("slot freed");
        assert_eq!(l.open_for(ip), 2);
    }

    #[test]
    fn node_limit() {
        let l = ConnLimiter::new(1, 1);
        let a = l.acquire().expect("a");
        assert!(matches!(l.acquire(), Err(LimitError::Node)));
        drop(a);
        assert!(l.acquire().is_ok());
    }

    #[test]
    fn cidrs_match_mapped_v4() {
        let c = Cidrs::parse(&["10.0.0.0/8".into(), "::1".into()]);
        assert!(c.contains("10.1.2.3".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(c.contains("::1".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
    }
}
