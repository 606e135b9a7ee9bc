//! Counters of the endpoint, as plain atomics so any metrics system can read them.
//!
//! Every dropped packet is counted under exactly one reason, so an operator can tell an attack
//! (garbage, unknown keys), a misbehaving CVM (spoofing, forwarding attempts) and a routing gap
//! (no route, no endpoint) apart.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters. Cheap to bump (relaxed atomics); read with [`Counters::snapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    /// UDP datagrams received on the WireGuard socket.
    pub rx_datagrams: AtomicU64,
    /// UDP payload bytes received.
    pub rx_bytes: AtomicU64,
    /// UDP datagrams sent.
    pub tx_datagrams: AtomicU64,
    /// UDP payload bytes sent.
    pub tx_bytes: AtomicU64,
    /// Datagrams larger than the configured cap (dropped before any parsing).
    pub oversized_datagrams: AtomicU64,
    /// Datagrams that are not WireGuard messages or fail the MAC1 check (garbage, scans).
    pub invalid_datagrams: AtomicU64,
    /// Handshake initiations whose static key is not a configured peer (or that do not decrypt).
    pub unknown_peer_handshakes: AtomicU64,
    /// Responses, cookies or data for a session index no current peer owns (e.g. a removed peer).
    pub unknown_session_index: AtomicU64,
    /// Messages from a known peer that boringtun rejected (bad AEAD tag, replayed counter, stale
    /// handshake, no session).
    pub decapsulate_errors: AtomicU64,
    /// Cookie replies sent because the handshake rate limit was hit.
    pub cookie_replies_sent: AtomicU64,
    /// Decrypted packets whose inner source address is not the sending peer's tunnel address.
    pub spoofed_source: AtomicU64,
    /// Decrypted packets addressed to anyone but this endpoint: forwarding between peers refused.
    pub not_for_us: AtomicU64,
    /// Decrypted packets that are not well-formed IP or exceed the tunnel MTU.
    pub malformed_inner: AtomicU64,
    /// Decrypted packets delivered to the TCP/IP stack.
    pub inner_packets_in: AtomicU64,
    /// Packets the stack emitted that were encrypted and sent.
    pub inner_packets_out: AtomicU64,
    /// Outgoing packets for an address no peer owns.
    pub no_route: AtomicU64,
    /// Outgoing packets for a peer whose UDP endpoint is not known yet.
    pub no_endpoint: AtomicU64,
    /// UDP send or receive errors.
    pub socket_errors: AtomicU64,
    /// Handshakes completed (sessions established, either side initiating).
    pub handshakes_completed: AtomicU64,
    /// Tunnel TCP connections opened by `connect`.
    pub connects_ok: AtomicU64,
    /// `connect` attempts that failed (refused, timed out, no route).
    pub connects_failed: AtomicU64,
    /// Tunnel TCP connections accepted by listeners.
    pub accepted: AtomicU64,
    /// Accepted connections reset because the listener's queue was full.
    pub accept_overflow: AtomicU64,
    /// Panics inside the TCP/IP stack, each of which dropped every tunnel TCP connection of
    /// this endpoint (WireGuard sessions survive).
    pub stack_panics: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[allow(missing_docs)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub rx_datagrams: u64,
    pub rx_bytes: u64,
    pub tx_datagrams: u64,
    pub tx_bytes: u64,
    pub oversized_datagrams: u64,
    pub invalid_datagrams: u64,
    pub unknown_peer_handshakes: u64,
    pub unknown_session_index: u64,
    pub decapsulate_errors: u64,
    pub cookie_replies_sent: u64,
    pub spoofed_source: u64,
    pub not_for_us: u64,
    pub malformed_inner: u64,
    pub inner_packets_in: u64,
    pub inner_packets_out: u64,
    pub no_route: u64,
    pub no_endpoint: u64,
    pub socket_errors: u64,
    pub handshakes_completed: u64,
    pub connects_ok: u64,
    pub connects_failed: u64,
    pub accepted: u64,
    pub accept_overflow: u64,
    pub stack_panics: u64,
}

impl Counters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            rx_datagrams: g(&self.rx_datagrams),
            rx_bytes: g(&self.rx_bytes),
            tx_datagrams: g(&self.tx_datagrams),
            tx_bytes: g(&self.tx_bytes),
            oversized_datagrams: g(&self.oversized_datagrams),
            invalid_datagrams: g(&self.invalid_datagrams),
            unknown_peer_handshakes: g(&self.unknown_peer_handshakes),
            unknown_session_index: g(&self.unknown_session_index),
            decapsulate_errors: g(&self.decapsulate_errors),
            cookie_replies_sent: g(&self.cookie_replies_sent),
            spoofed_source: g(&self.spoofed_source),
            not_for_us: g(&self.not_for_us),
            malformed_inner: g(&self.malformed_inner),
            inner_packets_in: g(&self.inner_packets_in),
            inner_packets_out: g(&self.inner_packets_out),
            no_route: g(&self.no_route),
            no_endpoint: g(&self.no_endpoint),
            socket_errors: g(&self.socket_errors),
            handshakes_completed: g(&self.handshakes_completed),
            connects_ok: g(&self.connects_ok),
            connects_failed: g(&self.connects_failed),
            accepted: g(&self.accepted),
            accept_overflow: g(&self.accept_overflow),
            stack_panics: g(&self.stack_panics),
        }
    }
}
