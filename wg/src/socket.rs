//! The UDP socket the endpoint runs on, behind a trait so callers bind it (port 0 in tests, a
//! configured address in production) and a simulator can stand in for it later.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::ReadBuf;

/// A datagram socket, polled like tokio's `UdpSocket`.
pub trait DatagramSocket: Send + Sync + 'static {
    /// Receives one datagram into `buf`, returning its source.
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<SocketAddr>>;

    /// Sends one datagram to `target`.
    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>>;

    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Asks the kernel for `bytes` of receive and send buffer (capped by
    /// `net.core.rmem_max`/`wmem_max`) and returns the receive buffer granted. The default does
    /// nothing, for sockets that are not kernel sockets.
    fn set_buffer_sizes(&self, bytes: usize) -> io::Result<usize> {
        let _ = bytes;
        Ok(0)
    }
}

impl DatagramSocket for tokio::net::UdpSocket {
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<SocketAddr>> {
        tokio::net::UdpSocket::poll_recv_from(self, cx, buf)
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        tokio::net::UdpSocket::poll_send_to(self, cx, buf, target)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }

    fn set_buffer_sizes(&self, bytes: usize) -> io::Result<usize> {
        let s = socket2::SockRef::from(self);
        s.set_recv_buffer_size(bytes)?;
        s.set_send_buffer_size(bytes)?;
        s.recv_buffer_size()
    }
}

impl<T: DatagramSocket> DatagramSocket for Arc<T> {
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<SocketAddr>> {
        (**self).poll_recv_from(cx, buf)
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_send_to(cx, buf, target)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        (**self).local_addr()
    }

    fn set_buffer_sizes(&self, bytes: usize) -> io::Result<usize> {
        (**self).set_buffer_sizes(bytes)
    }
}
