//! The application side of tunnel TCP connections: [`TunnelStream`] and [`TunnelListener`].
//!
//! A stream never touches smoltcp. It exchanges byte chunks with the driver task over two bounded
//! channels and pokes the driver's `Notify` when it made progress, so no lock is shared and
//! backpressure works both ways: a full channel stops the driver reading the socket, which
//! closes the TCP window toward the peer.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::PollSender;

/// Largest chunk moved in one channel message.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;
/// Chunks buffered per direction between a stream and the driver.
pub(crate) const CHANNEL_CHUNKS: usize = 8;

/// A TCP connection through the WireGuard tunnel.
///
/// Dropping it closes the connection gracefully (pending data, then FIN), like a kernel socket.
/// `poll_flush` hands data to the endpoint; it does not wait for the peer's ACK.
pub struct TunnelStream {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    read_buf: Bytes,
    tx: PollSender<Bytes>,
    notify: Arc<Notify>,
    local: SocketAddr,
    peer: SocketAddr,
}

/// The driver's ends of a stream's channels.
pub(crate) struct Pipes {
    pub to_app: Option<mpsc::Sender<io::Result<Bytes>>>,
    pub from_app: mpsc::Receiver<Bytes>,
}

impl TunnelStream {
    pub(crate) fn new_pair(
        notify: Arc<Notify>,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> (TunnelStream, Pipes) {
        let (to_app, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let (tx, from_app) = mpsc::channel(CHANNEL_CHUNKS);
        let stream = TunnelStream {
            rx,
            read_buf: Bytes::new(),
            tx: PollSender::new(tx),
            notify,
            local,
            peer,
        };
        let pipes = Pipes {
            to_app: Some(to_app),
            from_app,
        };
        (stream, pipes)
    }

    /// This end's tunnel address and port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The other end's tunnel address and port.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.read_buf.is_empty() {
            match ready!(this.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => {
                    this.read_buf = chunk;
                    // A channel slot just freed up; the driver may have stopped reading the
                    // socket because the channel was full.
                    this.notify.notify_one();
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())), // EOF
            }
        }
        let n = this.read_buf.len().min(buf.remaining());
        buf.put_slice(&this.read_buf[..n]);
        this.read_buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if ready!(this.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(broken_pipe(this.peer)));
        }
        let n = buf.len().min(MAX_CHUNK);
        if this
            .tx
            .send_item(Bytes::copy_from_slice(&buf[..n]))
            .is_err()
        {
            return Poll::Ready(Err(broken_pipe(this.peer)));
        }
        this.notify.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing our sender tells the driver to send FIN once the queued chunks are out.
        self.tx.close();
        self.notify.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        // The channels close with us; wake the driver so it closes the TCP side promptly.
        self.notify.notify_one();
    }
}

fn broken_pipe(peer: SocketAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        format!("tunnel connection to {peer} is closed"),
    )
}

/// Accepts TCP connections arriving through the tunnel on one port of this endpoint's tunnel
/// address. Dropping it stops listening.
pub struct TunnelListener {
    pub(crate) port: u16,
    pub(crate) rx: mpsc::Receiver<TunnelStream>,
}

impl TunnelListener {
    /// The next connection. `None` once the endpoint has shut down.
    pub async fn accept(&mut self) -> Option<TunnelStream> {
        self.rx.recv().await
    }

    /// The listened tunnel port.
    pub fn port(&self) -> u16 {
        self.port
    }
}
