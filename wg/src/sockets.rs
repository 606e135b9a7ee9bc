//! The driver's TCP sockets, each alone in a one-slot smoltcp `SocketSet`.
//!
//! smoltcp polls a whole `SocketSet` at once, so a panic inside it cannot be pinned on one
//! socket, and a socket that panicked half-way through an update must never be polled again.
//! Here every socket has its own set: the driver hands each incoming packet to the set of the
//! socket it belongs to and runs egress set by set, each step inside `catch_unwind`
//! ([`Sockets::run`]). If the stack panics, the one socket it was working on is replaced and
//! its connection fails; its siblings never notice.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

/// A socket's key, never reused while the driver runs.
pub(crate) type SockId = u64;

struct Slot {
    set: SocketSet<'static>,
    handle: SocketHandle,
}

pub(crate) struct Sockets {
    slots: HashMap<SockId, Slot>,
    next_id: SockId,
    /// For packets no socket owns: smoltcp answers them (RST) or drops them.
    empty: SocketSet<'static>,
}

/// What a panic inside smoltcp said.
pub(crate) struct Panicked(pub String);

impl Sockets {
    pub fn new() -> Self {
        Self {
            slots: HashMap::new(),
            next_id: 1,
            empty: SocketSet::new(Vec::new()),
        }
    }

    pub fn add(&mut self, socket: tcp::Socket<'static>) -> SockId {
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let handle = set.add(socket);
        let id = self.next_id;
        self.next_id += 1;
        self.slots.insert(id, Slot { set, handle });
        id
    }

    pub fn remove(&mut self, id: SockId) {
        self.slots.remove(&id);
    }

    /// Puts `socket` in the place of the socket `id` (same key).
    pub fn replace(&mut self, id: SockId, socket: tcp::Socket<'static>) {
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let handle = set.add(socket);
        self.slots.insert(id, Slot { set, handle });
    }

    /// The socket `id`. Panics if there is none: the driver only asks for sockets it holds.
    pub fn get(&self, id: SockId) -> &tcp::Socket<'static> {
        let slot = &self.slots[&id];
        slot.set.get::<tcp::Socket>(slot.handle)
    }

    /// The socket `id`, mutably. Panics if there is none, like [`Sockets::get`].
    pub fn get_mut(&mut self, id: SockId) -> &mut tcp::Socket<'static> {
        let slot = self.slots.get_mut(&id).expect("a socket the driver holds");
        slot.set.get_mut::<tcp::Socket>(slot.handle)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Every socket's key, into `out` (cleared first), so the caller can run them one by one
    /// while replacing some.
    pub fn ids_into(&self, out: &mut Vec<SockId>) {
        out.clear();
        out.extend(self.slots.keys().copied());
    }

    /// Runs `f` on the set of socket `id` (on an empty set for `None`, or for an `id` the
    /// driver no longer holds), catching a panic.
    pub fn run<R>(
        &mut self,
        id: Option<SockId>,
        f: impl FnOnce(&mut SocketSet<'static>) -> R,
    ) -> Result<R, Panicked> {
        let set = match id.and_then(|id| self.slots.get_mut(&id)) {
            Some(slot) => &mut slot.set,
            None => &mut self.empty,
        };
        catch_unwind(AssertUnwindSafe(|| f(set))).map_err(|panic| {
            Panicked(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default(),
            )
        })
    }
}
