//! How the edge reaches backends: the [`Upstream`] connector trait, its plain TCP
//! implementation, and the adapter that lets hyper's pooled client use any `Upstream`.
//!
//! The WireGuard tunnel (issue 4) plugs in as another `Upstream`; nothing above this module
//! knows how bytes reach a CVM.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where to connect; parsed in the pure `hostport` file so that it is fuzzed.
pub use super::hostport::Target;

/// A byte stream to a backend.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub type BoxedIo = Box<dyn Io>;

/// Opens byte streams to backends. Implementations must not block; the caller applies the
/// connect timeout.
#[async_trait::async_trait]
pub trait Upstream: Send + Sync + 'static {
    async fn connect(&self, target: &Target) -> io::Result<BoxedIo>;
}

/// Plain TCP to `backend_addr`: for tests, the local demo and apps outside the tunnel.
#[derive(Debug, Default, Clone)]
pub struct TcpUpstream;

#[async_trait::async_trait]
impl Upstream for TcpUpstream {
    async fn connect(&self, target: &Target) -> io::Result<BoxedIo> {
        let s = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await?;
        // Requests and responses are written whole by hyper; Nagle would only add latency.
        s.set_nodelay(true)?;
        Ok(Box::new(s))
    }
}

/// Connects with a deadline; a timeout is reported as `io::ErrorKind::TimedOut`.
pub async fn connect_with_timeout(
    up: &dyn Upstream,
    target: &Target,
    timeout: Duration,
) -> io::Result<BoxedIo> {
    match tokio::time::timeout(timeout, up.connect(target)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {target} timed out after {timeout:?}"),
        )),
    }
}

/// A backend stream as hyper's client wants it.
pub struct UpstreamStream(BoxedIo);

impl AsyncRead for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Adapts an [`Upstream`] to hyper-util's connector interface. The pool keys connections by
/// the request URI's authority, which is the backend address, so each backend has its own pool.
#[derive(Clone)]
pub struct HyperConnector {
    pub upstream: Arc<dyn Upstream>,
    pub timeout: Duration,
}

impl tower::Service<http::Uri> for HyperConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let up = self.upstream.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let target = uri
                .authority()
                .and_then(|a| Target::parse(a.as_str()))
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("no backend address in {uri}"),
                    )
                })?;
            let io = connect_with_timeout(up.as_ref(), &target, timeout).await?;
            Ok(TokioIo::new(UpstreamStream(io)))
        })
    }
}
