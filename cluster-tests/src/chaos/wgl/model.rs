//! One key's operations as the search sees them: values interned to small ids (the values no
//! operation can observe merged into one), operation kinds with the register's transition
//! ([`step`]), the required operations, and classes of interchangeable indeterminate ones.

use std::collections::HashMap;

/// Value ids: `ABSENT` is `None`, `UNOBSERVED` stands for every value no operation can tell apart.
pub(super) const ABSENT: u32 = 0;
pub(super) const UNOBSERVED: u32 = 1;
/// Completion position of an operation that never completes.
pub(super) const INF: usize = usize::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Read(u32),
    Write(u32),
    /// A CAS that returned true.
    CasOk {
        expect: u32,
        new: u32,
    },
    /// A CAS that returned false.
    CasRefused {
        expect: u32,
    },
    /// A CAS with an unknown result.
    CasMaybe {
        expect: u32,
        new: u32,
    },
}

/// The register's transition: the new value, or `None` if the operation's recorded result is
/// impossible in state `s`.
pub(super) fn step(kind: Kind, s: u32) -> Option<u32> {
    match kind {
        Kind::Read(v) => (s == v).then_some(s),
        Kind::Write(v) => Some(v),
        Kind::CasOk { expect, new } => (s == expect).then_some(new),
        Kind::CasRefused { expect } => (s != expect).then_some(s),
        Kind::CasMaybe { expect, new } => Some(if s == expect { new } else { s }),
    }
}

/// An operation with a known result: it must be linearized between `call` and `ret`.
pub(super) struct ReqOp {
    pub(super) call: usize,
    pub(super) ret: usize,
    pub(super) kind: Kind,
    /// Index into the key's raw operations.
    pub(super) raw: usize,
}

/// Interchangeable indeterminate operations, sorted by invocation.
pub(super) struct Class {
    pub(super) kind: Kind,
    /// (invocation position, index into the raw ops)
    pub(super) members: Vec<(usize, usize)>,
}

/// The values of one key, interned to small ids.
pub(super) struct Values {
    ids: HashMap<String, u32>,
    pub(super) names: Vec<String>,
    /// Ids below this were interned before any write: they are the values some operation can
    /// tell apart (see `check_key`).
    observable: u32,
    unobserved_examples: Vec<String>,
}

impl Values {
    pub(super) fn new() -> Self {
        Values {
            ids: HashMap::new(),
            names: vec!["absent".to_string(), "<unobserved>".to_string()],
            observable: 2,
            unobserved_examples: Vec::new(),
        }
    }

    pub(super) fn id(&mut self, v: &str) -> u32 {
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.ids.insert(v.to_string(), id);
        self.names.push(format!("{v:?}"));
        id
    }

    /// Ends the first pass: every value interned so far is observable.
    pub(super) fn seal_observable(&mut self) {
        self.observable = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
    }

    /// The id of a value written by an indeterminate operation: its own if some operation can
    /// observe it, else `UNOBSERVED` (so that such operations fall into few classes).
    pub(super) fn info_written(&mut self, v: &str) -> u32 {
        match self.ids.get(v) {
            Some(&id) if id < self.observable => id,
            _ => {
                if self.unobserved_examples.len() < 3
                    && !self.unobserved_examples.iter().any(|e| e == v)
                {
                    self.unobserved_examples.push(v.to_string());
                }
                UNOBSERVED
            }
        }
    }

    pub(super) fn show(&self, id: u32) -> String {
        if id == UNOBSERVED {
            let ex: Vec<String> = self
                .unobserved_examples
                .iter()
                .map(|e| format!("{e:?}"))
                .collect();
            format!("a value no operation observed (e.g. {})", ex.join(", "))
        } else {
            self.names
                .get(id as usize)
                .cloned()
                .unwrap_or_else(|| format!("#{id}"))
        }
    }
}
