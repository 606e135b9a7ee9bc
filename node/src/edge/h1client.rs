//! A pooled HTTP/1.1 client for requests without a body, run inside the request's own task.
//!
//! Most of what a gateway forwards is `GET`s with no body. hyper's pooled client sends each
//! one through channels to a task that owns the connection, and streams the response body
//! back through another: two task switches, a pool lock keyed by a hashed URI and a handful of
//! allocations per request. Here the request's task writes the head, parses the response
//! (httparse) and reads the body straight off the connection, which goes back to its pool as
//! soon as the body is complete. Requests with a body, upgrades and h2c backends stay on
//! hyper's client (`super::proxy`): streaming a body up while a response streams down needs
//! both directions driven at once, which is exactly what hyper's connection task is for.
//!
//! Idle connections are kept per backend address, per event loop (as hyper's pools are), and
//! checked before reuse: one the backend closed while it sat idle is dropped, not written to.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, Response};
use http_body::{Body, Frame, SizeHint};
use sync_wrapper::SyncWrapper;
use tokio::io::AsyncWriteExt;

use super::h1wire::MAX_HEAD_BYTES;
use super::h1wire::{decode_chunk, encode_head, parse_head, Chunk, Decoded, Framing, Parsed};
use super::upstream::{connect_with_timeout, BoxedIo, Target, Upstream};

/// Read buffers grow by this much when they run low.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened: nothing reached the backend, so another may be tried.
    #[error("{0}")]
    Connect(io::Error),
    #[error("{0}")]
    Io(io::Error),
    #[error("malformed response: {0}")]
    Malformed(String),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

/// One event loop's idle connections to every backend it used.
pub struct H1Pool {
    upstream: Arc<dyn Upstream>,
    connect_timeout: Duration,
    /// A response body that brings no byte for this long fails.
    body_stall: Duration,
    shared: Arc<Shared>,
}

struct Shared {
    /// Closed after this long unused.
    idle: Duration,
    max_idle: usize,
    /// Uncontended: only its event loop uses it, besides the reaper every `idle / 2`. Never
    /// held across an await.
    conns: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

struct Conn {
    /// The backend address it is pooled under.
    key: Arc<str>,
    io: BoxedIo,
    /// Read but not yet consumed; empty whenever the connection is idle.
    buf: BytesMut,
}

impl H1Pool {
    pub fn new(
        upstream: Arc<dyn Upstream>,
        connect_timeout: Duration,
        idle: Duration,
        max_idle: usize,
        body_stall: Duration,
    ) -> Self {
        H1Pool {
            upstream,
            connect_timeout,
            body_stall,
            shared: Arc::new(Shared {
                idle,
                max_idle,
                conns: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Closes connections idle for longer than the idle timeout.
    pub fn reap(&self) {
        let now = Instant::now();
        let idle = self.shared.idle;
        let mut conns = self.shared.lock();
        conns.retain(|_, v| {
            v.retain(|c| now.duration_since(c.since) < idle);
            !v.is_empty()
        });
    }

    /// How long a connection may sit idle in the pool.
    pub fn idle_timeout(&self) -> Duration {
        self.shared.idle
    }

    /// Idle connections kept, over all backends.
    pub fn idle_count(&self) -> usize {
        self.shared.lock().values().map(Vec::len).sum()
    }

    /// Sends a request with no body to `addr` (`host:port`), reusing an idle connection when
    /// one is alive, and returns the response once its head has arrived; the body streams.
    pub async fn send(
        &self,
        addr: &str,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<Response<H1Body>, SendError> {
        let head = encode_head(method, path_and_query, headers);
        let no_body = *method == Method::HEAD;
        // A pooled connection can have been closed by the backend the moment it was picked.
        // Then nothing was answered, and an idempotent request is sent again on another one
        // (RFC 9110 §9.2.2); others get the error rather than risk running twice.
        let idempotent = matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        while let Some(conn) = self.shared.checkout(addr) {
            match exchange(conn, &head, no_body).await {
                Ok((parts, framing, conn)) => return Ok(self.response(parts, framing, conn)),
                Err((e, answered)) if answered || !idempotent => return Err(e),
                Err((e, _)) => {
                    tracing::debug!(error = %e, backend = addr, "pooled connection was closed; trying another");
                }
            }
        }
        let target = Target::parse(addr).ok_or_else(|| {
            SendError::Connect(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr:?} is not host:port"),
            ))
        })?;
        let io = connect_with_timeout(&*self.upstream, &target, self.connect_timeout)
            .await
            .map_err(SendError::Connect)?;
        let conn = Conn {
            key: addr.into(),
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        };
        let (parts, framing, conn) = exchange(conn, &head, no_body).await.map_err(|(e, _)| e)?;
        Ok(self.response(parts, framing, conn))
    }

    fn response(
        &self,
        parts: http::response::Parts,
        framing: Framing,
        conn: Conn,
    ) -> Response<H1Body> {
        let mut body = H1Body {
            framing,
            conn: Some(SyncWrapper::new(Lease {
                conn,
                pool: self.shared.clone(),
            })),
            done: false,
            stall: Stall {
                limit: self.body_stall,
                timer: None,
                armed: false,
            },
        };
        if body.framing.complete() {
            body.finish();
        }
        Response::from_parts(parts, body)
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Vec<Idle>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used live connection to `addr`.
    fn checkout(&self, addr: &str) -> Option<Conn> {
        let now = Instant::now();
        let mut conns = self.lock();
        let list = conns.get_mut(addr)?;
        while let Some(Idle { mut conn, since }) = list.pop() {
            if now.duration_since(since) < self.idle && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        let mut conns = self.lock();
        let list = conns.entry(conn.key.clone()).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

impl Conn {
    /// Whether an idle connection can carry a request: nothing is readable on it. A backend
    /// that closed it (EOF), reset it, or sent bytes nobody asked for has made it unusable.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = tokio::io::ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut *self.io).poll_read(&mut cx, &mut rb),
            Poll::Pending
        )
    }

    /// Reads more bytes; `Ok(0)` is end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// The error of an exchange, and whether any byte of a response had arrived.
type ExchangeError = (SendError, bool);

/// Writes the request head, then reads until a final response head is parsed.
async fn exchange(
    mut conn: Conn,
    head: &[u8],
    head_request: bool,
) -> Result<(http::response::Parts, Framing, Conn), ExchangeError> {
    let io_err = |e: io::Error, answered: bool| (SendError::Io(e), answered);
    conn.io
        .write_all(head)
        .await
        .map_err(|e| io_err(e, false))?;
    conn.io.flush().await.map_err(|e| io_err(e, false))?;
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            answered = true;
            match parse_head(&mut conn.buf, head_request)
                .map_err(|e| (SendError::Malformed(e), true))?
            {
                Parsed::Final(parts, framing) => return Ok((parts, framing, conn)),
                Parsed::Informational => continue,
                Parsed::Partial => {}
            }
        }
        if conn.buf.len() > MAX_HEAD_BYTES {
            return Err((
                SendError::Malformed(format!("response head over {MAX_HEAD_BYTES} bytes")),
                true,
            ));
        }
        let n = conn.fill().await.map_err(|e| io_err(e, answered))?;
        if n == 0 {
            let e = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend closed the connection before a complete response head",
            );
            return Err(io_err(e, answered));
        }
    }
}

/// The connection a response body is read from, and where it goes back to.
struct Lease {
    conn: Conn,
    pool: Arc<Shared>,
}

/// A response body read straight off the backend connection. The connection returns to its
/// pool when the body is complete and nothing follows it; dropped early, it is closed.
pub struct H1Body {
    framing: Framing,
    /// Only ever reached through `&mut self`, so the body is `Sync` (as `BoxBody` wants)
    /// though the stream is not.
    conn: Option<SyncWrapper<Lease>>,
    done: bool,
    stall: Stall,
}

/// The deadline for the next byte of a body. The timer exists only once a read has had to
/// wait: most bodies arrive with their head, and a timer per request is measurable CPU.
struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the timer counts from the current wait (it is reset when bytes arrive).
    armed: bool,
}

impl Stall {
    /// Reads more of the body, failing with `TimedOut` after `limit` without a byte.
    fn poll_fill(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(r) = conn.poll_fill(cx) {
            self.armed = false;
            return Poll::Ready(r);
        }
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match std::future::Future::poll(timer.as_mut(), cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the backend sent no byte of the body for {:?}", self.limit),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("framing", &self.framing)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    fn finish(&mut self) {
        self.done = true;
        if let Some(lease) = self.conn.take().map(SyncWrapper::into_inner) {
            // Bytes past the end of the response were never asked for: not a clean connection.
            if self.framing.reusable() && lease.conn.buf.is_empty() {
                lease.pool.put(lease.conn);
            }
        }
    }

    /// Ends the body with an error; the connection is closed, never pooled.
    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.done = true;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }

    fn malformed(&mut self, e: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.fail(io::Error::new(io::ErrorKind::InvalidData, e.into()))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(lease) = this.conn.as_mut().map(SyncWrapper::get_mut) else {
                return Poll::Ready(None);
            };
            let conn = &mut lease.conn;
            match &mut this.framing {
                Framing::Length { remaining, .. } => {
                    if conn.buf.is_empty() {
                        match std::task::ready!(this.stall.poll_fill(conn, cx)) {
                            Ok(0) => {
                                return this.malformed("backend closed the connection mid-body")
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(e),
                        }
                    }
                    let n = (conn.buf.len() as u64).min(*remaining) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        // Back to the pool before the last frame is even sent, so the next
                        // request on this event loop finds the connection free.
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match std::task::ready!(this.stall.poll_fill(conn, cx)) {
                        Ok(0) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(_) => continue,
                        Err(e) => return this.fail(e),
                    }
                }
                Framing::Chunked { state, .. } => match decode_chunk(&mut conn.buf, state) {
                    Ok(Decoded::Data(d)) => {
                        if *state == Chunk::Done {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    Ok(Decoded::Trailers(t)) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::Progress) => {
                        if *state == Chunk::Done {
                            this.finish();
                            return Poll::Ready(None);
                        }
                    }
                    Ok(Decoded::NeedMore) => {
                        match std::task::ready!(this.stall.poll_fill(conn, cx)) {
                            Ok(0) => {
                                return this.malformed("backend closed the connection mid-body")
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(e),
                        }
                    }
                    Err(e) => return this.malformed(e),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.framing, self.done) {
            (_, true) => SizeHint::with_exact(0),
            (Framing::Length { remaining, .. }, false) => SizeHint::with_exact(*remaining),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{self, HeaderValue};
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use crate::edge::upstream::TcpUpstream;

    fn pool() -> H1Pool {
        H1Pool::new(
            Arc::new(TcpUpstream),
            Duration::from_secs(2),
            Duration::from_secs(30),
            4,
            Duration::from_secs(30),
        )
    }

    /// A backend that answers each request it reads with the next canned response, then
    /// closes after the last one. Returns its address and every request head it read.
    async fn backend(
        responses: Vec<&'static [u8]>,
    ) -> (String, tokio::task::JoinHandle<(Vec<String>, usize)>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let h = tokio::spawn(async move {
            let mut heads = Vec::new();
            let mut accepted = 0;
            let mut responses = responses.into_iter();
            'conns: loop {
                let (mut s, _) = l.accept().await.expect("accept");
                accepted += 1;
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            continue 'conns;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        continue;
                    };
                    heads.push(String::from_utf8_lossy(&buf[..end + 4]).into_owned());
                    buf.drain(..end + 4);
                    let Some(r) = responses.next() else {
                        return (heads, accepted);
                    };
                    s.write_all(r).await.expect("write");
                    if responses.len() == 0 {
                        return (heads, accepted);
                    }
                }
            }
        });
        (addr, h)
    }

    fn get_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        h
    }

    async fn get(p: &H1Pool, addr: &str, path: &str) -> Result<Response<H1Body>, SendError> {
        p.send(addr, &Method::GET, path, &get_headers()).await
    }

    async fn body_of(r: Response<H1Body>) -> Result<(Bytes, Option<HeaderMap>), io::Error> {
        let c = r.into_body().collect().await?;
        let trailers = c.trailers().cloned();
        Ok((c.to_bytes(), trailers))
    }

    #[tokio::test]
    async fn content_length_bodies_reuse_one_connection() {
        let (addr, h) = backend(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nno!",
        ])
        .await;
        let p = pool();
        let r = get(&p, &addr, "/a?b=c").await.expect("first");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-a"], "1");
        assert_eq!(body_of(r).await.expect("body").0, "hello");
        assert_eq!(p.idle_count(), 1, "the connection went back to the pool");
        let r = get(&p, &addr, "/second").await.expect("second");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_of(r).await.expect("body").0, "no!");
        let (heads, accepted) = h.await.expect("backend");
        assert_eq!(accepted, 1, "both requests on one connection");
        assert!(
            heads[0].starts_with("GET /a?b=c HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(heads[0].contains("host: app.example\r\n"));
        assert!(heads[0].contains("x-forwarded-for: 192.0.2.1\r\n"));
        assert!(heads[1].starts_with("GET /second HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn chunked_bodies_with_trailers_and_informational_heads() {
        let (addr, h) = backend(vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Checksum: 42\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ])
        .await;
        let p = pool();
        let r = get(&p, &addr, "/").await.expect("first");
        assert_eq!(r.status(), StatusCode::OK);
        let (body, trailers) = body_of(r).await.expect("body");
        assert_eq!(body, "hello world");
        assert_eq!(trailers.expect("trailers")["x-checksum"], "42");
        assert_eq!(p.idle_count(), 1);
        let r = get(&p, &addr, "/").await.expect("second");
        assert_eq!(body_of(r).await.expect("body").0, "abc");
        assert_eq!(h.await.expect("backend").1, 1);
    }

    #[tokio::test]
    async fn a_body_delimited_by_close_is_read_to_the_end_and_not_pooled() {
        let (addr, h) = backend(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"]).await;
        let p = pool();
        let r = get(&p, &addr, "/").await.expect("send");
        // The backend task returns after writing, which closes the connection.
        h.await.expect("backend");
        assert_eq!(body_of(r).await.expect("body").0, "until the end");
        assert_eq!(p.idle_count(), 0);
    }

    #[tokio::test]
    async fn head_and_no_content_have_no_body_whatever_they_declare() {
        let (addr, _h) = backend(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ])
        .await;
        let p = pool();
        let r = p
            .send(&addr, &Method::HEAD, "/", &get_headers())
            .await
            .expect("head");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "1000");
        assert!(r.body().is_end_stream());
        assert_eq!(body_of(r).await.expect("body").0, "");
        let r = p
            .send(&addr, &Method::DELETE, "/", &get_headers())
            .await
            .expect("204");
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(body_of(r).await.expect("body").0, "");
        let r = get(&p, &addr, "/").await.expect("get");
        assert_eq!(body_of(r).await.expect("body").0, "ok");
    }

    #[tokio::test]
    async fn connection_close_and_http10_are_not_pooled() {
        let (addr, h) = backend(vec![
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
        ])
        .await;
        let p = pool();
        let r = get(&p, &addr, "/").await.expect("send");
        assert_eq!(body_of(r).await.expect("body").0, "a");
        assert_eq!(p.idle_count(), 0);
        h.await.expect("backend");
        let (addr, _h) = backend(vec![b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb"]).await;
        let r = get(&p, &addr, "/").await.expect("send");
        assert_eq!(body_of(r).await.expect("body").0, "b");
        assert_eq!(p.idle_count(), 0);
    }

    fn pooled_open(p: &H1Pool) -> bool {
        let mut conns = p.shared.lock();
        let mut all = conns.values_mut().flat_map(|v| v.iter_mut());
        all.any(|c| c.conn.still_open())
    }

    #[tokio::test]
    async fn a_pooled_connection_the_backend_closed_is_replaced() {
        // The backend answers once per connection, then closes it: the pooled connection is
        // dead by the time of the second request.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.expect("accept");
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                drop(s);
            }
        });
        let p = pool();
        for i in 0..4 {
            let r = get(&p, &addr, "/")
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(body_of(r).await.expect("body").0, "ok");
            // Odd rounds wait until the backend's close has reached us, so the dead connection
            // is refused at checkout; even rounds go at once and may find out by writing to
            // it, which must be retried as well.
            if i % 2 == 1 {
                let deadline = Instant::now() + Duration::from_secs(5);
                while pooled_open(&p) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn malformed_responses_are_errors() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ] {
            let (addr, _h) = backend(vec![bad]).await;
            let e = get(&pool(), &addr, "/").await.expect_err("malformed");
            assert!(matches!(e, SendError::Malformed(_)), "{e:?}");
        }
        let (addr, _h) = backend(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ])
        .await;
        let r = get(&pool(), &addr, "/").await.expect("head is fine");
        assert!(body_of(r).await.is_err(), "a bad chunk size fails the body");
    }

    #[tokio::test]
    async fn a_signed_chunk_size_fails_the_body_and_the_connection_is_not_pooled() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        ] {
            let (addr, _h) =
                backend(vec![bad, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]).await;
            let p = pool();
            let r = get(&p, &addr, "/").await.expect("the head is fine");
            let e = body_of(r).await.expect_err("a signed chunk size");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert_eq!(
                p.idle_count(),
                0,
                "a connection that failed mid-body was pooled"
            );
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        let e = get(&pool(), &addr, "/").await.expect_err("nothing listens");
        assert!(e.is_connect(), "{e:?}");
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_reaped() {
        let (addr, _h) = backend(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let p = H1Pool::new(
            Arc::new(TcpUpstream),
            Duration::from_secs(2),
            Duration::from_millis(1),
            4,
            Duration::from_secs(30),
        );
        let r = get(&p, &addr, "/").await.expect("send");
        body_of(r).await.expect("body");
        assert_eq!(p.idle_count(), 1);
        let since = Instant::now();
        while since.elapsed() < Duration::from_millis(2) {
            tokio::task::yield_now().await;
        }
        p.reap();
        assert_eq!(p.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_that_stalls_fails_after_the_stall_limit() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                .await;
            // Holds the connection open without another byte.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let stall = Duration::from_millis(200);
        let p = H1Pool::new(
            Arc::new(TcpUpstream),
            Duration::from_secs(2),
            Duration::from_secs(30),
            4,
            stall,
        );
        let r = get(&p, &addr, "/").await.expect("head");
        let start = Instant::now();
        let e = body_of(r).await.expect_err("stalled body");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(start.elapsed() >= stall, "{:?}", start.elapsed());
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(p.idle_count(), 0);
    }
}
