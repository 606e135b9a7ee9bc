//! The endpoint's one task: it owns the UDP socket, every peer's `Tunn`, the smoltcp interface
//! and all TCP sockets, so nothing here is shared and nothing is locked. The outside talks to it
//! through a command channel ([`Command`]) and the per-connection channels in [`crate::stream`].
//!
//! Each loop turn waits for one event (a command, a datagram, a timer tick, an application
//! poke, or smoltcp's own deadline), handles it, then runs the stack: poll smoltcp, encrypt what
//! it emitted, move bytes between sockets and applications, and poll again if that made room.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};
use boringtun::x25519;
use bytes::{Buf, Bytes};
use smoltcp::iface::{Config, Interface, PollResult};
use smoltcp::socket::tcp::{self, CongestionControl, State};
use smoltcp::wire::{HardwareAddress, IpCidr, IpEndpoint};
use tokio::io::ReadBuf;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::EndpointConfig;
use crate::device::VirtualDevice;
use crate::error::WgError;
use crate::key::PublicKey;
use crate::metrics::Counters;
use crate::packet;
use crate::peers::{PeerDiff, PeerStats, PeerTable};
use crate::socket::DatagramSocket;
use crate::sockets::{Panicked, SockId, Sockets};
use crate::stream::{Pipes, TunnelListener, TunnelStream, MAX_CHUNK};
use crate::PeerConfig;

/// Boringtun's handshake rate limit per second before it demands cookies (its device default).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Datagrams handled per wake-up before the stack runs; amortizes smoltcp polls under load.
const RECV_BATCH: usize = 64;
/// Segments smoltcp may emit per stack round before the driver encrypts and sends them (up to
/// four rounds per wake-up). smoltcp emits at most one segment per socket per egress pass, so
/// one pass per round left a bulk sender ACK-clocked at one or two segments per wake-up (about
/// 20 MB/s toward kernel TCP). More passes fill the window, but the burst must stay small:
/// smoltcp's Reno never leaves exponential growth and recovers losses go-back-N, so bursts of
/// 32+ segments per round overflowed a 208 KiB UDP receive buffer (wireguard-go's default) and
/// collapsed throughput to a few MB/s. Measured in docs/benchmarks.md.
///
/// With smoltcp 0.13 the bound also keeps uploads alive: `Interface::poll` there repeats egress
/// passes until no socket has anything left, i.e. a whole 256 KiB window (~190 segments) per
/// call. That burst overflowed wireguard-go's UDP buffer, and 0.13 doubles the RTO on every
/// retransmission, fast ones included (smoltcp#1155, fixed in 0.14): a cascade of go-back-N fast
/// retransmits pushed the RTO to its 60 s maximum within 100 ms, and the next tail loss then
/// waited 60 s. That was the gateway→CVM upload stall of tunnel-bench; `poll_stack` therefore
/// never calls `Interface::poll` (docs/wireguard.md "smoltcp version").
const EGRESS_BATCH: usize = 8;
/// How long a connection the application has dropped may take to finish closing before it is
/// reset (bounds FIN_WAIT_2 against a peer that never closes).
const LINGER: Duration = Duration::from_secs(30);
/// TCP keepalive and dead-peer timeout on tunnel connections: a CVM that vanishes without a
/// FIN frees its gateway connections within `TCP_TIMEOUT`.
const TCP_KEEPALIVE: Duration = Duration::from_secs(25);
const TCP_TIMEOUT: Duration = Duration::from_secs(90);
const EPHEMERAL_FIRST: u16 = 49152;
/// WireGuard message type of a cookie reply (first byte; the other three are zero).
const MSG_COOKIE_REPLY: u8 = 3;

pub(crate) enum Command {
    SetPeers(Vec<PeerConfig>, oneshot::Sender<Result<PeerDiff, WgError>>),
    UpdatePeers {
        upsert: Vec<PeerConfig>,
        remove: Vec<PublicKey>,
        reply: oneshot::Sender<Result<PeerDiff, WgError>>,
    },
    Connect {
        remote: SocketAddr,
        reply: oneshot::Sender<Result<TunnelStream, WgError>>,
    },
    Listen {
        port: u16,
        reply: oneshot::Sender<Result<TunnelListener, WgError>>,
    },
    Stats(oneshot::Sender<Vec<PeerStats>>),
}

enum Event {
    Command(Command),
    Datagram(io::Result<(SocketAddr, usize)>),
    Timer,
    Wake,
}

struct Conn {
    local_port: u16,
    remote: IpEndpoint,
    phase: Phase,
}

enum Phase {
    Connecting {
        reply: oneshot::Sender<Result<TunnelStream, WgError>>,
        addr: SocketAddr,
    },
    Open(Box<OpenConn>),
    /// The application is gone; TCP is finishing its close (bounded by `LINGER`).
    Closing {
        since: Instant,
    },
    /// Aborted; removed on the next pass, after the poll that sends the RST.
    Aborted,
}

struct OpenConn {
    pipes: Pipes,
    pending: Option<Bytes>,
    app_write_closed: bool,
    fin_sent: bool,
    /// Set when the stack panicked on this connection (`Driver::stack_panicked`).
    failed: bool,
}

struct Listener {
    tx: mpsc::Sender<TunnelStream>,
    ready: Vec<SockId>,
}

pub(crate) struct Driver<S> {
    socket: S,
    cfg: EndpointConfig,
    own: OwnIps,
    max_datagram: usize,
    static_private: x25519::StaticSecret,
    static_public: x25519::PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: PeerTable,
    counters: Arc<Counters>,
    notify: Arc<Notify>,
    iface: Interface,
    device: VirtualDevice,
    sockets: Sockets,
    conns: HashMap<SockId, Conn>,
    listeners: HashMap<u16, Listener>,
    /// Connections by (local port, remote endpoint): where an incoming segment goes.
    tuples: HashMap<(u16, IpEndpoint), SockId>,
    next_port: u16,
    start: Instant,
    rx_buf: Vec<u8>,
    out_buf: Vec<u8>,
    /// Scratch list of socket keys for the egress and deadline passes.
    ids: Vec<SockId>,
    /// Makes the stack panic the next time it works on this socket (containment tests).
    #[cfg(test)]
    panic_socket: Option<SockId>,
}

impl<S: DatagramSocket> Driver<S> {
    pub fn new(
        cfg: EndpointConfig,
        socket: S,
        counters: Arc<Counters>,
        notify: Arc<Notify>,
    ) -> Self {
        let static_private = cfg.private_key.to_x25519();
        let static_public = x25519::PublicKey::from(&static_private);
        let own_key = PublicKey::from_bytes(static_public.to_bytes());
        let rate_limiter = Arc::new(RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT));
        let peers = PeerTable::new(own_key, cfg.tunnel_ip, static_private.clone())
            .with_secondary_ip(cfg.secondary_ip);

        let start = Instant::now();
        let mut device = VirtualDevice::new(cfg.mtu);
        let mut config = Config::new(HardwareAddress::Ip);
        // Seeds TCP initial sequence numbers and ephemeral choices; the default (0) would make
        // them predictable to an on-path peer.
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        let own = OwnIps {
            primary: cfg.tunnel_ip,
            secondary: cfg.secondary_ip,
        };
        // At most one address per family (validate() checks), so smoltcp's default room for
        // two addresses and two routes always suffices.
        for own_ip in std::iter::once(own.primary).chain(own.secondary) {
            iface.update_ip_addrs(|addrs| {
                let prefix = if own_ip.is_ipv4() { 32 } else { 128 };
                let _ = addrs.push(IpCidr::new(own_ip.into(), prefix));
            });
            // Peers are not on a subnet of ours: a default route makes every destination
            // reachable, and the driver picks the peer by destination when it encrypts. With
            // Medium::Ip there is no neighbor resolution, so the gateway address is never used.
            let routed = match own_ip {
                IpAddr::V4(a) => iface.routes_mut().add_default_ipv4_route(a).is_ok(),
                IpAddr::V6(a) => iface.routes_mut().add_default_ipv6_route(a).is_ok(),
            };
            debug_assert!(
                routed,
                "the route table has room for one default route per family"
            );
        }

        let max_datagram = cfg.max_datagram();
        Self {
            socket,
            own,
            max_datagram,
            static_private,
            static_public,
            rate_limiter,
            peers,
            counters,
            notify,
            iface,
            device,
            sockets: Sockets::new(),
            conns: HashMap::new(),
            listeners: HashMap::new(),
            tuples: HashMap::new(),
            next_port: EPHEMERAL_FIRST + rand::random::<u16>() % (u16::MAX - EPHEMERAL_FIRST),
            start,
            // Big enough for any UDP datagram, so oversized ones are seen whole and counted
            // instead of silently truncated.
            rx_buf: vec![0u8; 65536],
            out_buf: vec![0u8; 65536 + 256],
            ids: Vec::new(),
            #[cfg(test)]
            panic_socket: None,
            cfg,
        }
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut timers = tokio::time::interval(self.cfg.timer_interval);
        timers.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_limiter_reset = Instant::now();
        loop {
            let stack_delay = self.stack_delay(self.smol_now());
            let event = {
                let socket = &self.socket;
                let mut rb = ReadBuf::new(&mut self.rx_buf);
                // Not biased: under a datagram flood, timers and applications still get turns.
                tokio::select! {
                    cmd = commands.recv() => match cmd {
                        Some(c) => Event::Command(c),
                        None => break,
                    },
                    r = poll_fn(|cx| {
                        socket
                            .poll_recv_from(cx, &mut rb)
                            .map(|r| r.map(|from| (from, rb.filled().len())))
                    }) => Event::Datagram(r),
                    _ = timers.tick() => Event::Timer,
                    _ = self.notify.notified() => Event::Wake,
                    _ = tokio::time::sleep(stack_delay) => Event::Wake,
                }
            };
            match event {
                Event::Command(c) => self.handle_command(c),
                Event::Datagram(Ok((from, len))) => {
                    self.handle_datagram(from, len).await;
                    self.drain_socket().await;
                }
                Event::Datagram(Err(e)) => {
                    Counters::inc(&self.counters.socket_errors);
                    tracing::debug!(error = %e, "udp receive failed");
                }
                Event::Timer => {
                    self.tick_timers().await;
                    if last_limiter_reset.elapsed() >= Duration::from_secs(1) {
                        // A limiter shared by all peers is not reset by any Tunn: our job.
                        self.rate_limiter.reset_count();
                        last_limiter_reset = Instant::now();
                    }
                }
                Event::Wake => {}
            }
            self.run_stack().await;
        }
        tracing::debug!("endpoint handles dropped; driver stops");
    }

    /// Reads whatever else is already queued on the socket, without waiting.
    async fn drain_socket(&mut self) {
        for _ in 0..RECV_BATCH {
            let polled = {
                let mut rb = ReadBuf::new(&mut self.rx_buf);
                let mut cx = Context::from_waker(Waker::noop());
                self.socket
                    .poll_recv_from(&mut cx, &mut rb)
                    .map(|r| r.map(|from| (from, rb.filled().len())))
            };
            match polled {
                Poll::Ready(Ok((from, len))) => {
                    self.handle_datagram(from, len).await;
                }
                Poll::Ready(Err(e)) => {
                    Counters::inc(&self.counters.socket_errors);
                    tracing::debug!(error = %e, "udp receive failed");
                    break;
                }
                Poll::Pending => break,
            }
        }
    }

    async fn handle_datagram(&mut self, from: SocketAddr, len: usize) {
        let c = &*self.counters;
        Counters::inc(&c.rx_datagrams);
        Counters::add(&c.rx_bytes, len);
        if len > self.max_datagram {
            Counters::inc(&c.oversized_datagrams);
            return;
        }
        let data = &self.rx_buf[..len];
        let mut cookie = [0u8; 64];
        // MAC1 check and endpoint-wide handshake rate limiting first: cheap, and it keeps the
        // DH in parse_handshake_anon out of reach of anyone who does not know our public key.
        // (boringtun's `handle_verified_packet` is crate-private, so the peer's Tunn verifies
        // the MACs once more in `decapsulate`, against its own per-peer limit.)
        let packet = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), data, &mut cookie)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(reply)) => {
                Counters::inc(&c.cookie_replies_sent);
                send_udp(&self.socket, c, reply, from).await;
                return;
            }
            Err(_) => {
                Counters::inc(&c.invalid_datagrams);
                tracing::trace!(%from, len, "dropped invalid datagram");
                return;
            }
        };
        let kind = match packet {
            Packet::HandshakeInit(_) => "init",
            Packet::HandshakeResponse(_) => "response",
            Packet::PacketCookieReply(_) => "cookie",
            Packet::PacketData(_) => "data",
        };
        let peer = match &packet {
            Packet::HandshakeInit(init) => {
                parse_handshake_anon(&self.static_private, &self.static_public, init)
                    .ok()
                    .and_then(|half| {
                        self.peers
                            .get_mut(&PublicKey::from_bytes(half.peer_static_public))
                    })
            }
            Packet::HandshakeResponse(p) => self.peers.by_session_index(p.receiver_idx),
            Packet::PacketCookieReply(p) => self.peers.by_session_index(p.receiver_idx),
            Packet::PacketData(p) => self.peers.by_session_index(p.receiver_idx),
        };
        let Some(peer) = peer else {
            if kind == "init" {
                Counters::inc(&c.unknown_peer_handshakes);
                tracing::debug!(%from, "handshake from an unknown key dropped");
            } else {
                Counters::inc(&c.unknown_session_index);
                tracing::trace!(%from, kind, "message for an unknown session dropped");
            }
            return;
        };

        match peer
            .tunn
            .decapsulate(Some(from.ip()), data, &mut self.out_buf)
        {
            TunnResult::Done => peer.endpoint = Some(from),
            TunnResult::Err(e) => {
                Counters::inc(&c.decapsulate_errors);
                tracing::trace!(peer = %peer.config.public_key, error = ?e, kind, "rejected");
            }
            TunnResult::WriteToNetwork(reply) if reply.first() == Some(&MSG_COOKIE_REPLY) => {
                // The peer is over its own handshake budget: it gets a cookie, nothing else.
                Counters::inc(&c.cookie_replies_sent);
                send_udp(&self.socket, c, reply, from).await;
            }
            TunnResult::WriteToNetwork(reply) => {
                // Only authenticated messages get here, so following the source is roaming,
                // not hijacking.
                peer.endpoint = Some(from);
                if kind == "init" || kind == "response" {
                    Counters::inc(&c.handshakes_completed);
                    tracing::debug!(peer = %peer.config.public_key, %from, "handshake completed");
                }
                send_udp(&self.socket, c, reply, from).await;
                // Packets boringtun queued while the handshake was pending go out now.
                while let TunnResult::WriteToNetwork(queued) =
                    peer.tunn.decapsulate(None, &[], &mut self.out_buf)
                {
                    send_udp(&self.socket, c, queued, from).await;
                }
            }
            TunnResult::WriteToTunnelV4(inner, src) => {
                peer.endpoint = Some(from);
                admit_inner(
                    c,
                    &mut self.device,
                    inner,
                    src.into(),
                    peer.config.tunnel_ip,
                    self.own,
                    self.cfg.mtu,
                );
            }
            TunnResult::WriteToTunnelV6(inner, src) => {
                peer.endpoint = Some(from);
                admit_inner(
                    c,
                    &mut self.device,
                    inner,
                    src.into(),
                    peer.config.tunnel_ip,
                    self.own,
                    self.cfg.mtu,
                );
            }
        }
    }

    async fn tick_timers(&mut self) {
        let c = &*self.counters;
        for peer in self.peers.iter_mut() {
            match peer.tunn.update_timers(&mut self.out_buf) {
                TunnResult::WriteToNetwork(p) => match peer.endpoint {
                    Some(ep) => send_udp(&self.socket, c, p, ep).await,
                    None => Counters::inc(&c.no_endpoint),
                },
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    tracing::trace!(peer = %peer.config.public_key, "session expired");
                }
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %peer.config.public_key, error = ?e, "timer error");
                }
                _ => {}
            }
        }
    }

    /// Encrypts everything smoltcp emitted, each packet to the peer owning its destination.
    async fn flush_tx(&mut self) {
        let c = &*self.counters;
        while let Some(pkt) = self.device.tx.pop_front() {
            let Some(hdr) = packet::parse(&pkt) else {
                Counters::inc(&c.malformed_inner);
                continue;
            };
            let Some(peer) = self.peers.by_ip(&hdr.dst) else {
                Counters::inc(&c.no_route);
                continue;
            };
            let Some(endpoint) = peer.endpoint else {
                Counters::inc(&c.no_endpoint);
                continue;
            };
            match peer.tunn.encapsulate(&pkt, &mut self.out_buf) {
                TunnResult::WriteToNetwork(out) => {
                    Counters::inc(&c.inner_packets_out);
                    send_udp(&self.socket, c, out, endpoint).await;
                }
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %peer.config.public_key, error = ?e, "encapsulate failed");
                }
                // Queued inside boringtun until the handshake completes.
                _ => {}
            }
        }
    }

    async fn run_stack(&mut self) {
        // Bounded: each round can only make progress the previous one enabled.
        for _ in 0..4 {
            let now = self.smol_now();
            self.poll_stack(now);
            self.flush_tx().await;
            let conns_changed = self.service_conns();
            let listeners_changed = self.service_listeners();
            if !conns_changed && !listeners_changed {
                break;
            }
        }
    }

    /// One pass of the TCP/IP stack: every queued incoming packet, each to the socket it
    /// belongs to, then egress passes over all sockets until nothing moves or `EGRESS_BATCH`
    /// packets are queued.
    ///
    /// Not `Interface::poll`: since smoltcp 0.13 it repeats egress passes until no socket has
    /// anything left to send (see `EGRESS_BATCH`), and it runs every socket in one go. Here
    /// each socket runs in its own set ([`Sockets`]), so a panic of the stack (smoltcp asserts
    /// its invariants with panics; smoltcp#1048 was one) is pinned on one socket, which is
    /// replaced: that connection fails, its siblings go on.
    fn poll_stack(&mut self, now: smoltcp::time::Instant) {
        self.iface.poll_maintenance(now);
        while let Some(packet) = self.device.rx.front() {
            let queued = self.device.rx.len();
            let owner = self.owner(packet);
            let (iface, device) = (&mut self.iface, &mut self.device);
            #[cfg(test)]
            let inject = owner.is_some() && owner == self.panic_socket.take();
            let ran = self.sockets.run(owner, |set| {
                #[cfg(test)]
                if inject {
                    panic!("injected stack panic");
                }
                iface.poll_ingress_single(now, device, set)
            });
            if let Err(panic) = ran {
                if self.device.rx.len() == queued {
                    self.device.rx.pop_front();
                }
                self.stack_panicked(owner, panic);
            }
        }
        let mut ids = std::mem::take(&mut self.ids);
        loop {
            let mut moved = false;
            self.sockets.ids_into(&mut ids);
            for &id in &ids {
                let (iface, device) = (&mut self.iface, &mut self.device);
                #[cfg(test)]
                let inject = self.panic_socket == Some(id) && self.panic_socket.take().is_some();
                let ran = self.sockets.run(Some(id), |set| {
                    #[cfg(test)]
                    if inject {
                        panic!("injected stack panic");
                    }
                    iface.poll_egress(now, device, set)
                });
                match ran {
                    Ok(PollResult::SocketStateChanged) => moved = true,
                    Ok(PollResult::None) => {}
                    Err(panic) => self.stack_panicked(Some(id), panic),
                }
            }
            if !moved || self.device.tx.len() >= EGRESS_BATCH {
                break;
            }
        }
        self.ids = ids;
    }

    /// How long until smoltcp wants to be polled (its timers), at most an hour.
    fn stack_delay(&mut self, now: smoltcp::time::Instant) -> Duration {
        let mut ids = std::mem::take(&mut self.ids);
        self.sockets.ids_into(&mut ids);
        let mut soonest = Duration::from_secs(3600);
        for &id in &ids {
            let iface = &mut self.iface;
            match self.sockets.run(Some(id), |set| iface.poll_delay(now, set)) {
                Ok(Some(d)) => soonest = soonest.min(Duration::from_micros(d.total_micros())),
                Ok(None) => {}
                Err(panic) => {
                    self.stack_panicked(Some(id), panic);
                    soonest = Duration::ZERO;
                }
            }
        }
        self.ids = ids;
        soonest
    }

    /// The socket an incoming packet belongs to: its connection's, else (for a listened port)
    /// the listening socket that has it in its handshake, else an idle listening socket. `None`
    /// for anything else, which smoltcp answers without a socket (RST) or drops.
    fn owner(&self, packet: &[u8]) -> Option<SockId> {
        let src = packet::parse(packet)?.src;
        let (src_port, dst_port) = packet::tcp_ports(packet)?;
        let remote = IpEndpoint::new(src.into(), src_port);
        if let Some(&id) = self.tuples.get(&(dst_port, remote)) {
            return Some(id);
        }
        let ready = &self.listeners.get(&dst_port)?.ready;
        let sock = |id: &&SockId| self.sockets.get(**id);
        ready
            .iter()
            .find(|id| sock(id).remote_endpoint() == Some(remote))
            .or_else(|| ready.iter().find(|id| sock(id).state() == State::Listen))
            .copied()
    }

    /// A panic of the stack while it worked on socket `id` (`None`: on no socket). That socket
    /// may be half-updated and is never polled again: a connection's is replaced by a closed
    /// one, so the connection ends as if reset (a pending connect is refused, an open stream
    /// reads an error); a listening socket is replaced by a fresh one.
    fn stack_panicked(&mut self, id: Option<SockId>, panic: Panicked) {
        Counters::inc(&self.counters.stack_panics);
        let Some(id) = id else {
            tracing::error!(panic = %panic.0, "tcp/ip stack panicked on a packet no socket owns; dropped");
            return;
        };
        if let Some(conn) = self.conns.get(&id) {
            tracing::error!(panic = %panic.0, remote = %conn.remote, local_port = conn.local_port, "tcp/ip stack panicked; that tunnel connection fails");
            self.sockets.replace(id, new_tcp_socket(self.cfg.mtu));
            if let Some(Phase::Open(open)) = self.conns.get_mut(&id).map(|c| &mut c.phase) {
                // `pump` hands the application an error, not an EOF.
                open.failed = true;
            }
            return;
        }
        let port = self
            .listeners
            .iter()
            .find(|(_, l)| l.ready.contains(&id))
            .map(|(&port, _)| port);
        match port {
            Some(port) => {
                tracing::error!(panic = %panic.0, port, "tcp/ip stack panicked on a listening socket; it is replaced");
                let mut fresh = new_tcp_socket(self.cfg.tcp_buffer_bytes);
                let _ = fresh.listen(port);
                self.sockets.replace(id, fresh);
            }
            None => {
                tracing::error!(panic = %panic.0, "tcp/ip stack panicked on an unknown socket");
                self.sockets.remove(id);
            }
        }
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::SetPeers(list, reply) => {
                let result = self.peers.set(list);
                if let Ok(diff) = &result {
                    tracing::info!(
                        added = diff.added.len(),
                        removed = diff.removed.len(),
                        updated = diff.updated.len(),
                        unchanged = diff.unchanged,
                        "peers updated"
                    );
                    self.reset_orphaned_conns();
                }
                let _ = reply.send(result);
            }
            Command::UpdatePeers {
                upsert,
                remove,
                reply,
            } => {
                let result = self.peers.update(upsert, remove);
                if let Ok(diff) = &result {
                    tracing::debug!(
                        added = diff.added.len(),
                        removed = diff.removed.len(),
                        updated = diff.updated.len(),
                        "peers updated incrementally"
                    );
                    if !diff.removed.is_empty() || !diff.updated.is_empty() {
                        self.reset_orphaned_conns();
                    }
                }
                let _ = reply.send(result);
            }
            Command::Connect { remote, reply } => {
                if self.connect(remote, reply).is_err() {
                    Counters::inc(&self.counters.connects_failed);
                    tracing::debug!(%remote, "connect refused locally");
                }
            }
            Command::Listen { port, reply } => {
                let _ = reply.send(self.listen(port));
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.peers.stats());
            }
        }
    }

    /// Resets connections to addresses no peer owns any more: the application learns at once
    /// instead of after a TCP timeout.
    fn reset_orphaned_conns(&mut self) {
        for (&h, conn) in self.conns.iter_mut() {
            let ip = IpAddr::from(conn.remote.addr);
            if !self.peers.has_ip(&ip) {
                self.sockets.get_mut(h).abort();
                if let Phase::Closing { .. } = conn.phase {
                    conn.phase = Phase::Aborted;
                }
            }
        }
    }

    fn connect(
        &mut self,
        remote: SocketAddr,
        reply: oneshot::Sender<Result<TunnelStream, WgError>>,
    ) -> Result<(), ()> {
        let fail = |reply: oneshot::Sender<_>, e: WgError| {
            let _ = reply.send(Err(e));
            Err(())
        };
        if remote.port() == 0 {
            return fail(reply, WgError::InvalidPort(0));
        }
        if self.own.contains(remote.ip()) {
            return fail(reply, WgError::ConnectToSelf(remote.ip()));
        }
        if !self.peers.has_ip(&remote.ip()) {
            return fail(reply, WgError::NoRoute(remote.ip()));
        }
        if self.conns.len() >= self.cfg.max_connections {
            return fail(reply, WgError::TooManyConnections(self.conns.len()));
        }
        let remote_ep = IpEndpoint::from(remote);
        let Some(port) = self.alloc_port(remote_ep) else {
            return fail(reply, WgError::NoFreePort(remote));
        };
        let mut sock = new_tcp_socket(self.cfg.tcp_buffer_bytes);
        if let Err(e) = sock.connect(self.iface.context(), remote_ep, port) {
            tracing::debug!(%remote, error = ?e, "smoltcp connect failed");
            return fail(reply, WgError::ConnectRefused(remote));
        }
        let handle = self.sockets.add(sock);
        self.tuples.insert((port, remote_ep), handle);
        self.conns.insert(
            handle,
            Conn {
                local_port: port,
                remote: remote_ep,
                phase: Phase::Connecting {
                    reply,
                    addr: remote,
                },
            },
        );
        Ok(())
    }

    /// A local port no connection to `remote` uses.
    fn alloc_port(&mut self, remote: IpEndpoint) -> Option<u16> {
        let span = usize::from(u16::MAX - EPHEMERAL_FIRST) + 1;
        for _ in 0..span {
            let p = self.next_port;
            self.next_port = if p == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            if !self.tuples.contains_key(&(p, remote)) {
                return Some(p);
            }
        }
        None
    }

    fn listen(&mut self, port: u16) -> Result<TunnelListener, WgError> {
        if port == 0 {
            return Err(WgError::InvalidPort(0));
        }
        if let Some(l) = self.listeners.get(&port) {
            if !l.tx.is_closed() {
                return Err(WgError::PortInUse(port));
            }
            self.drop_listener(port);
        }
        let (tx, rx) = mpsc::channel(self.cfg.accept_queue);
        let mut ready = Vec::with_capacity(self.cfg.listen_backlog);
        for _ in 0..self.cfg.listen_backlog {
            ready.push(self.new_listening_socket(port));
        }
        self.listeners.insert(port, Listener { tx, ready });
        tracing::debug!(port, "listening on the tunnel");
        Ok(TunnelListener { port, rx })
    }

    fn new_listening_socket(&mut self, port: u16) -> SockId {
        let mut sock = new_tcp_socket(self.cfg.tcp_buffer_bytes);
        // Only fails on port 0 or a socket that is already open; neither can happen here.
        let _ = sock.listen(port);
        self.sockets.add(sock)
    }

    fn drop_listener(&mut self, port: u16) {
        if let Some(l) = self.listeners.remove(&port) {
            for h in l.ready {
                self.sockets.remove(h);
            }
        }
    }

    /// Moves listening sockets that completed a handshake into the connection table and hands
    /// their streams to the listener. Returns whether anything changed.
    fn service_listeners(&mut self) -> bool {
        let mut changed = false;
        let ports: Vec<u16> = self.listeners.keys().copied().collect();
        for port in ports {
            let Some(l) = self.listeners.get(&port) else {
                continue;
            };
            if l.tx.is_closed() {
                self.drop_listener(port);
                changed = true;
                continue;
            }
            for slot in 0..self.cfg.listen_backlog {
                let Some(&h) = self.listeners.get(&port).and_then(|l| l.ready.get(slot)) else {
                    break;
                };
                let sock = self.sockets.get_mut(h);
                match sock.state() {
                    State::Listen | State::SynReceived => continue,
                    State::Closed => {
                        // Reset during the handshake: listen again on the same socket.
                        let _ = sock.listen(port);
                        continue;
                    }
                    _ => {}
                }
                let Some(remote) = sock.remote_endpoint() else {
                    continue;
                };
                let replacement = self.new_listening_socket(port);
                let Some(l) = self.listeners.get_mut(&port) else {
                    continue;
                };
                l.ready[slot] = replacement;
                changed = true;

                let local = SocketAddr::new(self.own.for_remote(remote.addr.into()), port);
                let peer = SocketAddr::from((IpAddr::from(remote.addr), remote.port));
                let (stream, pipes) = TunnelStream::new_pair(self.notify.clone(), local, peer);
                self.tuples.insert((port, remote), h);
                let phase = if self.conns.len() >= self.cfg.max_connections {
                    drop(stream);
                    Counters::inc(&self.counters.accept_overflow);
                    self.sockets.get_mut(h).abort();
                    Phase::Aborted
                } else {
                    match l.tx.try_send(stream) {
                        Ok(()) => {
                            Counters::inc(&self.counters.accepted);
                            Phase::Open(Box::new(OpenConn::new(pipes)))
                        }
                        Err(_) => {
                            Counters::inc(&self.counters.accept_overflow);
                            self.sockets.get_mut(h).abort();
                            Phase::Aborted
                        }
                    }
                };
                self.conns.insert(
                    h,
                    Conn {
                        local_port: port,
                        remote,
                        phase,
                    },
                );
            }
        }
        changed
    }

    /// Moves bytes between TCP sockets and applications and advances connection lifecycles.
    /// Returns whether anything changed that warrants another smoltcp poll.
    fn service_conns(&mut self) -> bool {
        let mut changed = false;
        let mut finished = Vec::new();
        for (&h, conn) in self.conns.iter_mut() {
            let sock = self.sockets.get_mut(h);
            match &mut conn.phase {
                Phase::Connecting { reply, addr } => match sock.state() {
                    State::SynSent | State::SynReceived => {
                        if reply.is_closed() {
                            // The caller timed out and went away.
                            sock.abort();
                            conn.phase = Phase::Aborted;
                            Counters::inc(&self.counters.connects_failed);
                            changed = true;
                        }
                    }
                    State::Closed => {
                        let addr = *addr;
                        if let Phase::Connecting { reply, .. } =
                            std::mem::replace(&mut conn.phase, Phase::Aborted)
                        {
                            let _ = reply.send(Err(WgError::ConnectRefused(addr)));
                        }
                        Counters::inc(&self.counters.connects_failed);
                        finished.push(h);
                    }
                    _ => {
                        let local =
                            SocketAddr::new(self.own.for_remote(addr.ip()), conn.local_port);
                        let (stream, pipes) =
                            TunnelStream::new_pair(self.notify.clone(), local, *addr);
                        let Phase::Connecting { reply, .. } =
                            std::mem::replace(&mut conn.phase, Phase::Aborted)
                        else {
                            continue;
                        };
                        if reply.send(Ok(stream)).is_ok() {
                            Counters::inc(&self.counters.connects_ok);
                            conn.phase = Phase::Open(Box::new(OpenConn::new(pipes)));
                        } else {
                            Counters::inc(&self.counters.connects_failed);
                            sock.abort();
                        }
                        changed = true;
                    }
                },
                Phase::Open(open) => {
                    changed |= pump(sock, open);
                    let app_gone = open.app_write_closed
                        && open.pipes.to_app.as_ref().is_none_or(|t| t.is_closed());
                    if sock.state() == State::Closed {
                        // Not before the application has its error, if any (`pump`).
                        if open.pipes.to_app.is_none() {
                            finished.push(h);
                        }
                    } else if app_gone && open.fin_sent {
                        conn.phase = Phase::Closing {
                            since: Instant::now(),
                        };
                    }
                }
                Phase::Closing { since } => {
                    // Nobody reads any more: keep the window open so the peer can finish.
                    while sock.can_recv() {
                        if sock.recv(|b| (b.len(), ())).is_err() {
                            break;
                        }
                    }
                    match sock.state() {
                        State::Closed | State::TimeWait => finished.push(h),
                        _ if since.elapsed() > LINGER => {
                            sock.abort();
                            conn.phase = Phase::Aborted;
                            changed = true;
                        }
                        _ => {}
                    }
                }
                Phase::Aborted => finished.push(h),
            }
        }
        for h in finished {
            if let Some(conn) = self.conns.remove(&h) {
                self.tuples.remove(&(conn.local_port, conn.remote));
            }
            self.sockets.remove(h);
        }
        changed
    }
}

impl OpenConn {
    fn new(pipes: Pipes) -> Self {
        Self {
            pipes,
            pending: None,
            app_write_closed: false,
            fin_sent: false,
            failed: false,
        }
    }
}

/// One connection's data movement, both ways, plus EOF/reset/FIN propagation.
fn pump(sock: &mut tcp::Socket<'static>, open: &mut OpenConn) -> bool {
    let mut changed = false;

    // Peer → application, only as far as the channel has room (TCP window does the rest).
    while sock.can_recv() {
        let Some(tx) = &open.pipes.to_app else {
            // The application dropped its reader: discard so the peer can finish.
            let _ = sock.recv(|b| (b.len(), ()));
            changed = true;
            continue;
        };
        if tx.is_closed() {
            open.pipes.to_app = None;
            continue;
        }
        // Full: stop reading; the TCP window closes toward the peer until the app catches up.
        let Ok(permit) = tx.try_reserve() else {
            break;
        };
        match sock.recv(|b| {
            let n = b.len().min(MAX_CHUNK);
            (n, Bytes::copy_from_slice(&b[..n]))
        }) {
            Ok(chunk) => permit.send(Ok(chunk)),
            Err(_) => break,
        }
        changed = true;
    }
    if !sock.may_recv() {
        if let Some(tx) = &open.pipes.to_app {
            // Closed without our FIN and without passing through CLOSE_WAIT: a reset. The
            // application must read an error, not an EOF that makes a cut stream look whole,
            // so a full channel keeps the sender (and the connection) until there is room.
            let error = if open.failed {
                Some("tunnel connection failed: the TCP/IP stack panicked")
            } else if sock.state() == State::Closed && !open.fin_sent {
                Some("tunnel connection reset")
            } else {
                None
            };
            let delivered = match error {
                Some(msg) => !matches!(
                    tx.try_send(Err(io::Error::new(io::ErrorKind::ConnectionReset, msg))),
                    Err(mpsc::error::TrySendError::Full(_))
                ),
                None => true,
            };
            if delivered {
                // Dropping the sender is EOF once the application has read what is queued.
                open.pipes.to_app = None;
                changed = true;
            }
        }
    }

    // Application → peer.
    loop {
        if open.pending.is_none() {
            if open.app_write_closed {
                break;
            }
            match open.pipes.from_app.try_recv() {
                Ok(chunk) => open.pending = Some(chunk),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open.app_write_closed = true;
                    break;
                }
            }
        }
        let Some(p) = open.pending.as_mut() else {
            break;
        };
        if !sock.may_send() {
            // The connection cannot carry data any more (reset); the app will see it close.
            open.pending = None;
            break;
        }
        match sock.send_slice(p) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                p.advance(n);
                changed = true;
                if p.is_empty() {
                    open.pending = None;
                } else {
                    break;
                }
            }
        }
    }
    if open.app_write_closed && open.pending.is_none() && !open.fin_sent {
        sock.close();
        open.fin_sent = true;
        changed = true;
    }
    changed
}

/// The endpoint's own tunnel addresses: one, or one per family.
#[derive(Debug, Clone, Copy)]
struct OwnIps {
    primary: IpAddr,
    secondary: Option<IpAddr>,
}

impl OwnIps {
    fn contains(&self, ip: IpAddr) -> bool {
        ip == self.primary || Some(ip) == self.secondary
    }

    /// The own address a connection with `remote` uses: the one of the same family.
    fn for_remote(&self, remote: IpAddr) -> IpAddr {
        match self.secondary {
            Some(s) if s.is_ipv6() == remote.is_ipv6() => s,
            _ => self.primary,
        }
    }
}

/// Enforces the tunnel's address rules on a decrypted packet, then queues it for smoltcp.
fn admit_inner(
    c: &Counters,
    device: &mut VirtualDevice,
    inner: &[u8],
    src: IpAddr,
    allowed: IpAddr,
    own: OwnIps,
    mtu: usize,
) {
    // boringtun does not enforce AllowedIPs: without this check a peer could speak as any
    // other peer's address.
    if src != allowed {
        Counters::inc(&c.spoofed_source);
        tracing::debug!(%src, %allowed, "inner source is not the peer's address; dropped");
        return;
    }
    let Some(hdr) = packet::parse(inner) else {
        Counters::inc(&c.malformed_inner);
        return;
    };
    // Nothing is forwarded: a packet for anyone but us would be a peer trying to reach another
    // peer through this endpoint.
    if !own.contains(hdr.dst) {
        Counters::inc(&c.not_for_us);
        tracing::debug!(%src, dst = %hdr.dst, "inner packet not addressed to us; dropped");
        return;
    }
    if inner.len() > mtu {
        Counters::inc(&c.malformed_inner);
        return;
    }
    Counters::inc(&c.inner_packets_in);
    device.rx.push_back(inner.to_vec());
}

async fn send_udp<S: DatagramSocket>(socket: &S, c: &Counters, buf: &[u8], to: SocketAddr) {
    match poll_fn(|cx| socket.poll_send_to(cx, buf, to)).await {
        Ok(n) => {
            Counters::inc(&c.tx_datagrams);
            Counters::add(&c.tx_bytes, n);
        }
        Err(e) => {
            Counters::inc(&c.socket_errors);
            tracing::debug!(%to, error = %e, "udp send failed");
        }
    }
}

pub(crate) fn new_tcp_socket(buffer: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; rx_capacity(buffer)]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    );
    // Request/response traffic (HTTP through the gateway) must not wait for Nagle; bulk writes
    // arrive in 64 KiB chunks and fill segments anyway.
    s.set_nagle_enabled(false);
    s.set_keep_alive(Some(TCP_KEEPALIVE.into()));
    s.set_timeout(Some(TCP_TIMEOUT.into()));
    // Tunnels cross the internet between regions; without congestion control smoltcp sends
    // whatever the window allows and melts lossy paths.
    s.set_congestion_control(CongestionControl::Reno);
    s
}

/// The receive buffer for a wanted size: at most `wanted`, and more than half of it.
///
/// smoltcp 0.13.1 (0.14.0 reads the same) sends the window of its SYN or SYN-ACK unscaled, as
/// TCP requires, but records it as if it were scaled: until the socket sends its next segment,
/// it accepts data up to `65535 << shift` past the handshake (`shift` = bit length of the
/// capacity − 16). For a capacity of 2^k that is twice the buffer, and a peer's segment past
/// the buffer trips a debug assertion, delivers bytes that were never written, or (release
/// build) panics once the hole before it is filled
/// (`stack_tests::data_past_the_buffer_right_after_the_handshake_is_refused`). With
/// `65535 << shift <= capacity` the recorded window is an underestimate, which is harmless:
/// 256 KiB becomes 256 KiB − 1.
fn rx_capacity(wanted: usize) -> usize {
    let bits = usize::BITS - wanted.leading_zeros();
    if bits <= 16 {
        return wanted; // no window scaling
    }
    if wanted >= 65535 << (bits - 16) {
        wanted
    } else {
        (1 << (bits - 1)) - 1
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use smoltcp::wire::TcpControl;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::key::PrivateKey;
    use crate::stack_tests::{ipv4_tcp, parse_ipv4_tcp, Segment, MSS};

    const OWN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const PEER_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 7);

    /// A driver on 198.18.0.1 with one peer, 100.64.0.7 (no UDP endpoint: nothing is sent).
    async fn test_driver() -> (Driver<tokio::net::UdpSocket>, Arc<Counters>, IpAddr) {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind udp");
        let cfg = EndpointConfig::new(PrivateKey::generate(), IpAddr::V4(OWN_IP));
        let counters = Arc::new(Counters::default());
        let mut d = Driver::new(cfg, udp, counters.clone(), Arc::new(Notify::new()));
        let peer_ip = IpAddr::V4(PEER_IP);
        d.peers
            .set(vec![PeerConfig::new(
                PrivateKey::generate().public_key(),
                peer_ip,
            )])
            .expect("peer");
        (d, counters, peer_ip)
    }

    /// Our SYN for the connection on `id`, parsed from the device's queue.
    fn take_syn(d: &mut Driver<tokio::net::UdpSocket>, id: SockId) -> Segment {
        let port = d.conns[&id].local_port;
        let at = d
            .device
            .tx
            .iter()
            .position(|p| parse_ipv4_tcp(p).is_some_and(|(_, _, s)| s.src_port == port))
            .expect("a SYN from that connection");
        let (_, _, syn) = parse_ipv4_tcp(&d.device.tx.remove(at).expect("queued")).expect("TCP");
        assert_eq!(syn.control, TcpControl::Syn);
        syn
    }

    /// The peer's SYN-ACK to `syn`.
    fn syn_ack(syn: &Segment) -> Vec<u8> {
        let mut seg = Segment::new(syn.dst_port, syn.src_port, TcpControl::Syn, 7_000);
        seg.ack = Some(syn.seq.wrapping_add(1));
        seg.mss = Some(MSS as u16);
        ipv4_tcp(PEER_IP, OWN_IP, &seg)
    }

    fn conn_to(d: &Driver<tokio::net::UdpSocket>, port: u16) -> SockId {
        *d.conns
            .iter()
            .find(|(_, c)| c.remote.port == port)
            .expect("the connection")
            .0
    }

    /// A panic inside the stack costs the one connection it happened on: that connect is
    /// refused, an open stream reads an error (not EOF), a listening socket is replaced; the
    /// sibling connection completes its handshake and carries data, and the endpoint goes on.
    #[tokio::test]
    async fn a_stack_panic_fails_only_its_connection() {
        let (mut d, counters, peer_ip) = test_driver().await;
        let _listener = d.listen(8080).expect("listen");
        let listening = d.listeners[&8080].ready.clone();
        let (tx_a, pending_a) = oneshot::channel();
        d.connect(SocketAddr::new(peer_ip, 80), tx_a)
            .expect("connect queued");
        let (tx_b, pending_b) = oneshot::channel();
        d.connect(SocketAddr::new(peer_ip, 81), tx_b)
            .expect("connect queued");
        let (a, b) = (conn_to(&d, 80), conn_to(&d, 81));
        d.poll_stack(d.smol_now());
        let (syn_a, syn_b) = (take_syn(&mut d, a), take_syn(&mut d, b));

        // Ingress: the stack panics on A's SYN-ACK; B's is processed.
        d.device.rx.push_back(syn_ack(&syn_a));
        d.device.rx.push_back(syn_ack(&syn_b));
        d.panic_socket = Some(a);
        d.poll_stack(d.smol_now());
        d.service_conns();
        assert_eq!(counters.snapshot().stack_panics, 1);
        match pending_a.await.expect("connect A answered") {
            Err(WgError::ConnectRefused(addr)) => assert_eq!(addr.port(), 80),
            other => panic!("connect A: {other:?}"),
        }
        let mut stream_b = pending_b
            .await
            .expect("connect B answered")
            .expect("B connected");
        assert!(!d.conns.contains_key(&a) && !d.tuples.values().any(|&id| id == a));

        // B carries data.
        d.device.tx.clear();
        stream_b.write_all(b"hello").await.expect("write");
        d.service_conns();
        d.poll_stack(d.smol_now());
        let sent: Vec<Segment> = d
            .device
            .tx
            .iter()
            .filter_map(|p| parse_ipv4_tcp(p).map(|(_, _, s)| s))
            .collect();
        assert!(
            sent.iter()
                .any(|s| s.src_port == syn_b.src_port && s.payload == b"hello"),
            "{sent:?}"
        );

        // Egress: the stack panics on a listening socket, which is replaced by a fresh one.
        d.panic_socket = Some(listening[0]);
        d.poll_stack(d.smol_now());
        assert_eq!(counters.snapshot().stack_panics, 2);
        assert_eq!(d.listeners[&8080].ready, listening);
        for &id in &listening {
            assert_eq!(d.sockets.get(id).state(), State::Listen);
        }
        assert_eq!(d.sockets.get(b).state(), State::Established);

        // An open stream whose connection fails reads an error, not an EOF.
        d.panic_socket = Some(b);
        d.poll_stack(d.smol_now());
        d.service_conns();
        assert_eq!(counters.snapshot().stack_panics, 3);
        let mut buf = [0u8; 16];
        let read = stream_b.read(&mut buf).await;
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset)
        );
        d.service_conns();
        assert!(d.conns.is_empty() && d.tuples.is_empty());
        assert_eq!(d.sockets.len(), listening.len());

        // The endpoint goes on.
        let (tx, _pending) = oneshot::channel();
        d.connect(SocketAddr::new(peer_ip, 80), tx)
            .expect("connect after the panics");
        assert_eq!(d.conns.len(), 1);
    }

    /// The cause of the smoltcp 0.13 upload stall: one stack pass must not emit a sender's
    /// whole window. A connection with 256 KiB queued and an 8 MiB peer window sends it in
    /// passes of at most `EGRESS_BATCH` segments (`Interface::poll` of 0.13 sent all ~190 at
    /// once, which overflowed wireguard-go's UDP buffer).
    #[tokio::test]
    async fn a_stack_pass_emits_at_most_an_egress_batch() {
        let (mut d, _counters, peer_ip) = test_driver().await;
        let (tx, pending) = oneshot::channel();
        d.connect(SocketAddr::new(peer_ip, 80), tx)
            .expect("connect queued");
        let h = *d.conns.keys().next().expect("the connection");
        // The window, not Reno's slow start, is what limits this sender.
        d.sockets
            .get_mut(h)
            .set_congestion_control(CongestionControl::None);
        d.poll_stack(d.smol_now());
        let syn = d.device.tx.pop_front().expect("a SYN");
        let (_, _, syn) = parse_ipv4_tcp(&syn).expect("a TCP segment");
        assert_eq!(syn.control, TcpControl::Syn);

        let mut syn_ack = Segment::new(80, syn.src_port, TcpControl::Syn, 7_000);
        syn_ack.ack = Some(syn.seq.wrapping_add(1));
        syn_ack.window_scale = Some(7);
        syn_ack.mss = Some(MSS as u16);
        d.device.rx.push_back(ipv4_tcp(PEER_IP, OWN_IP, &syn_ack));
        // A SYN's window is never scaled: this ACK opens the 65535 << 7 window.
        let mut ack = Segment::new(80, syn.src_port, TcpControl::None, 7_001);
        ack.ack = syn_ack.ack;
        d.device.rx.push_back(ipv4_tcp(PEER_IP, OWN_IP, &ack));
        d.poll_stack(d.smol_now());
        d.device.tx.clear();
        d.service_conns();
        let mut stream = pending.await.expect("connect answered").expect("connected");
        let queued = 256 * 1024;
        stream.write_all(&vec![0x5a; queued]).await.expect("write");
        d.service_conns();
        assert_eq!(d.sockets.get(h).send_queue(), queued);

        let mut segments = 0;
        for _ in 0..100 {
            d.poll_stack(d.smol_now());
            let burst = d.device.tx.len();
            assert!(
                burst <= EGRESS_BATCH,
                "one stack pass emitted {burst} segments"
            );
            if burst == 0 {
                break;
            }
            segments += burst;
            d.device.tx.clear();
        }
        assert_eq!(segments, queued.div_ceil(MSS), "the whole buffer went out");
    }

    /// The receive buffer leaves no room for smoltcp's overestimated handshake window, and
    /// keeps at least half of what was asked.
    #[test]
    fn rx_capacity_holds_the_unscaled_syn_window_shifted() {
        for wanted in (1usize..=(1 << 22)).step_by(997).chain([
            65535,
            65536,
            131071,
            131072,
            262143,
            262144,
            1 << 22,
        ]) {
            let cap = rx_capacity(wanted);
            assert!(cap <= wanted && cap > wanted / 2, "{wanted} -> {cap}");
            let bits = usize::BITS - cap.leading_zeros();
            let shift = bits.saturating_sub(16);
            assert!(
                shift == 0 || 65535 << shift <= cap,
                "{wanted} -> {cap}: shift {shift}"
            );
        }
        assert_eq!(rx_capacity(256 * 1024), 256 * 1024 - 1);
    }
}
