//! `portcullis-modsec`: libmodsecurity's C API, opened at run time with `dlopen`. The only crate
//! of the workspace with unsafe code.
//!
//! Why not link it: the node must build and run on a machine without libmodsecurity (the
//! README's one-command local cluster), where apps simply cannot turn the WAF on. Why not the
//! `modsecurity` crate: it links at build time, and its header calls take `&str`, so header
//! values with NUL or non-UTF-8 bytes (attacker input) could not be passed as sent; the `_n_`
//! calls used here take lengths.
//!
//! Thread model (libmodsecurity 3): one `ModSecurity` and any number of compiled rule sets are
//! shared read-only by all threads; a transaction belongs to one thread at a time. The types
//! below encode that: [`RuleSet`] is `Send + Sync`, [`Tx`] is `Send` only.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Arc;

type Msc = c_void;
type Rules = c_void;
type Trans = c_void;

#[repr(C)]
struct Intervention {
    status: c_int,
    pause: c_int,
    url: *mut c_char,
    log: *mut c_char,
    disruptive: c_int,
}

/// The entry points used, copied out of the library (which `Library` keeps loaded).
struct Fns {
    init: unsafe extern "C" fn() -> *mut Msc,
    set_connector_info: unsafe extern "C" fn(*mut Msc, *const c_char),
    set_log_cb: unsafe extern "C" fn(*mut Msc, unsafe extern "C" fn(*mut c_void, *const c_void)),
    who_am_i: unsafe extern "C" fn(*mut Msc) -> *const c_char,
    create_rules_set: unsafe extern "C" fn() -> *mut Rules,
    rules_add: unsafe extern "C" fn(*mut Rules, *const c_char, *mut *const c_char) -> c_int,
    rules_cleanup: unsafe extern "C" fn(*mut Rules) -> c_int,
    new_transaction: unsafe extern "C" fn(*mut Msc, *mut Rules, *mut c_void) -> *mut Trans,
    process_connection:
        unsafe extern "C" fn(*mut Trans, *const c_char, c_int, *const c_char, c_int) -> c_int,
    process_uri:
        unsafe extern "C" fn(*mut Trans, *const c_char, *const c_char, *const c_char) -> c_int,
    add_n_request_header:
        unsafe extern "C" fn(*mut Trans, *const u8, usize, *const u8, usize) -> c_int,
    process_request_headers: unsafe extern "C" fn(*mut Trans) -> c_int,
    append_request_body: unsafe extern "C" fn(*mut Trans, *const u8, usize) -> c_int,
    process_request_body: unsafe extern "C" fn(*mut Trans) -> c_int,
    add_n_response_header:
        unsafe extern "C" fn(*mut Trans, *const u8, usize, *const u8, usize) -> c_int,
    process_response_headers: unsafe extern "C" fn(*mut Trans, c_int, *const c_char) -> c_int,
    append_response_body: unsafe extern "C" fn(*mut Trans, *const u8, usize) -> c_int,
    process_response_body: unsafe extern "C" fn(*mut Trans) -> c_int,
    intervention: unsafe extern "C" fn(*mut Trans, *mut Intervention) -> c_int,
    process_logging: unsafe extern "C" fn(*mut Trans) -> c_int,
    transaction_cleanup: unsafe extern "C" fn(*mut Trans),
}

/// The loaded library and its one `ModSecurity` instance.
pub struct Library {
    fns: Fns,
    msc: *mut Msc,
    /// Keeps the code behind `fns` mapped; dropped last.
    _lib: libloading::Library,
}

// SAFETY: the `ModSecurity` instance is only read after `open` (libmodsecurity's threading
// model: shared engine and rules, per-thread transactions).
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

/// The file names tried when no path is configured: Debian's runtime package installs the
/// versioned one.
const DEFAULT_NAMES: &[&str] = &["libmodsecurity.so.3", "libmodsecurity.so"];

impl Library {
    /// Loads libmodsecurity (`path`, or the system's) and starts its engine.
    pub fn open(path: Option<&str>) -> Result<Arc<Library>, String> {
        let names: Vec<&str> = match path {
            Some(p) => vec![p],
            None => DEFAULT_NAMES.to_vec(),
        };
        let mut errors = Vec::new();
        let lib = names.iter().find_map(|n| {
            // SAFETY: loading runs the library's initialisers; libmodsecurity's are plain C++
            // static constructors.
            match unsafe { libloading::Library::new(*n) } {
                Ok(l) => Some(l),
                Err(e) => {
                    errors.push(format!("{n}: {e}"));
                    None
                }
            }
        });
        let lib = lib.ok_or_else(|| {
            format!(
                "libmodsecurity 3 not found ({}); install Debian's libmodsecurity3 or set waf.library",
                errors.join("; ")
            )
        })?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the signature is the one in libmodsecurity 3's public C headers.
                *unsafe { lib.get($name) }.map_err(|e| {
                    format!(
                        "libmodsecurity lacks {}: {e}",
                        String::from_utf8_lossy(&$name[..$name.len() - 1])
                    )
                })?
            };
        }
        let fns = Fns {
            init: sym!(b"msc_init\0"),
            set_connector_info: sym!(b"msc_set_connector_info\0"),
            set_log_cb: sym!(b"msc_set_log_cb\0"),
            who_am_i: sym!(b"msc_who_am_i\0"),
            create_rules_set: sym!(b"msc_create_rules_set\0"),
            rules_add: sym!(b"msc_rules_add\0"),
            rules_cleanup: sym!(b"msc_rules_cleanup\0"),
            new_transaction: sym!(b"msc_new_transaction\0"),
            process_connection: sym!(b"msc_process_connection\0"),
            process_uri: sym!(b"msc_process_uri\0"),
            add_n_request_header: sym!(b"msc_add_n_request_header\0"),
            process_request_headers: sym!(b"msc_process_request_headers\0"),
            append_request_body: sym!(b"msc_append_request_body\0"),
            process_request_body: sym!(b"msc_process_request_body\0"),
            add_n_response_header: sym!(b"msc_add_n_response_header\0"),
            process_response_headers: sym!(b"msc_process_response_headers\0"),
            append_response_body: sym!(b"msc_append_response_body\0"),
            process_response_body: sym!(b"msc_process_response_body\0"),
            intervention: sym!(b"msc_intervention\0"),
            process_logging: sym!(b"msc_process_logging\0"),
            transaction_cleanup: sym!(b"msc_transaction_cleanup\0"),
        };
        // SAFETY: C calls with valid arguments; the connector string is copied by the library.
        let msc = unsafe { (fns.init)() };
        if msc.is_null() {
            return Err("msc_init failed".into());
        }
        let connector = c"portcullis";
        unsafe {
            (fns.set_connector_info)(msc, connector.as_ptr());
            (fns.set_log_cb)(msc, log_cb);
        }
        Ok(Arc::new(Library {
            fns,
            msc,
            _lib: lib,
        }))
    }

    /// The library's own name and version, e.g. `ModSecurity v3.0.9 (Linux)`.
    pub fn version(&self) -> String {
        // SAFETY: returns a pointer to a string owned by the engine, valid while it lives.
        let p = unsafe { (self.fns.who_am_i)(self.msc) };
        if p.is_null() {
            return "unknown".into();
        }
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Compiles SecLang text (which may `Include` files) into a rule set.
    pub fn compile(self: &Arc<Self>, seclang: &str) -> Result<RuleSet, String> {
        let text = CString::new(seclang).map_err(|_| "rule text holds a NUL byte".to_string())?;
        // SAFETY: a fresh rule set; on failure it is freed by `RuleSet`'s drop below.
        let rules = unsafe { (self.fns.create_rules_set)() };
        if rules.is_null() {
            return Err("msc_create_rules_set failed".into());
        }
        let set = RuleSet {
            lib: self.clone(),
            rules,
        };
        let mut err: *const c_char = std::ptr::null();
        let n = unsafe { (self.fns.rules_add)(rules, text.as_ptr(), &mut err) };
        if n < 0 {
            let msg = if err.is_null() {
                "rules failed to load (no message)".to_string()
            } else {
                // The error string is malloc'd by the library for the caller.
                let m = unsafe { CStr::from_ptr(err) }
                    .to_string_lossy()
                    .trim()
                    .to_string();
                unsafe { libc::free(err as *mut c_void) };
                m
            };
            return Err(msg);
        }
        Ok(set)
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // Rule sets and transactions hold an `Arc<Library>`, so none is left. The engine itself
        // (`msc_cleanup`) is not torn down: libmodsecurity keeps process-wide state that it
        // does not expect to be re-initialised, and a node loads the library once.
    }
}

/// A compiled rule set, shared by every transaction that evaluates with it.
pub struct RuleSet {
    lib: Arc<Library>,
    rules: *mut Rules,
}

// SAFETY: compiled rules are read-only once `compile` returned.
unsafe impl Send for RuleSet {}
unsafe impl Sync for RuleSet {}

impl Drop for RuleSet {
    fn drop(&mut self) {
        // SAFETY: no transaction outlives its `Arc<RuleSet>` (`Tx` holds one).
        unsafe { (self.lib.fns.rules_cleanup)(self.rules) };
    }
}

/// What a phase decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disruption {
    pub status: u16,
    pub log: Option<String>,
}

/// One transaction: a request (and its response) through the phases in order. Messages of
/// matched rules collect in `logs`.
pub struct Tx {
    set: Arc<RuleSet>,
    tx: *mut Trans,
    /// Boxed: the library holds the vector's own address (not its buffer's) as the log
    /// callback's argument, so the vector must not move when the `Tx` does.
    #[allow(clippy::box_collection)]
    logs: Box<Vec<String>>,
}

// SAFETY: a transaction is used by one thread at a time (`&mut self` on every call); moving it
// between threads between phases is allowed by libmodsecurity.
unsafe impl Send for Tx {}

unsafe extern "C" fn log_cb(data: *mut c_void, msg: *const c_void) {
    if data.is_null() || msg.is_null() {
        return;
    }
    // SAFETY: `data` is the `Vec<String>` a `Tx` registered and keeps alive; with the text log
    // property (`msc_set_log_cb`'s default) `msg` is a NUL-terminated string.
    let logs = unsafe { &mut *(data as *mut Vec<String>) };
    let text = unsafe { CStr::from_ptr(msg as *const c_char) };
    logs.push(text.to_string_lossy().into_owned());
}

/// A C string from bytes that may hold NULs (a URI, a method): cut at the first NUL, which is
/// what the library would have read anyway.
fn c_lossy(s: &[u8]) -> CString {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    CString::new(&s[..end]).unwrap_or_default()
}

impl Tx {
    pub fn new(set: &Arc<RuleSet>) -> Result<Tx, String> {
        let mut logs: Box<Vec<String>> = Box::default();
        let data = &mut *logs as *mut Vec<String> as *mut c_void;
        let lib = &set.lib;
        // SAFETY: engine and rules live as long as `set`, which the transaction holds.
        let tx = unsafe { (lib.fns.new_transaction)(lib.msc, set.rules, data) };
        if tx.is_null() {
            return Err("msc_new_transaction failed".into());
        }
        Ok(Tx {
            set: set.clone(),
            tx,
            logs,
        })
    }

    fn f(&self) -> &Fns {
        &self.set.lib.fns
    }

    /// The first disruptive action so far, if any.
    fn disruption(&mut self) -> Option<Disruption> {
        let mut it = Intervention {
            status: 200,
            pause: 0,
            url: std::ptr::null_mut(),
            log: std::ptr::null_mut(),
            disruptive: 0,
        };
        // SAFETY: `it` is a valid out-parameter; `url` and `log` are malloc'd for the caller.
        unsafe { (self.f().intervention)(self.tx, &mut it) };
        let log = (!it.log.is_null()).then(|| {
            let s = unsafe { CStr::from_ptr(it.log) }
                .to_string_lossy()
                .into_owned();
            unsafe { libc::free(it.log as *mut c_void) };
            s
        });
        if !it.url.is_null() {
            unsafe { libc::free(it.url as *mut c_void) };
        }
        (it.disruptive != 0).then(|| Disruption {
            status: u16::try_from(it.status).unwrap_or(403),
            log,
        })
    }

    pub fn connection(&mut self, client: &str, client_port: u16, server: &str, port: u16) {
        let (c, s) = (c_lossy(client.as_bytes()), c_lossy(server.as_bytes()));
        unsafe {
            (self.f().process_connection)(
                self.tx,
                c.as_ptr(),
                c_int::from(client_port),
                s.as_ptr(),
                c_int::from(port),
            )
        };
    }

    /// URI and the request headers (phase 1).
    pub fn request_head(
        &mut self,
        uri: &[u8],
        method: &[u8],
        version: &str,
        headers: &[(&[u8], &[u8])],
    ) -> Option<Disruption> {
        let (u, m, v) = (c_lossy(uri), c_lossy(method), c_lossy(version.as_bytes()));
        unsafe { (self.f().process_uri)(self.tx, u.as_ptr(), m.as_ptr(), v.as_ptr()) };
        for (k, v) in headers {
            unsafe {
                (self.f().add_n_request_header)(self.tx, k.as_ptr(), k.len(), v.as_ptr(), v.len())
            };
        }
        unsafe { (self.f().process_request_headers)(self.tx) };
        self.disruption()
    }

    /// The request body, or the part of it inspected (phase 2).
    pub fn request_body(&mut self, body: &[u8]) -> Option<Disruption> {
        if !body.is_empty() {
            unsafe { (self.f().append_request_body)(self.tx, body.as_ptr(), body.len()) };
        }
        unsafe { (self.f().process_request_body)(self.tx) };
        self.disruption()
    }

    /// Response status and headers (phase 3).
    pub fn response_head(&mut self, status: u16, headers: &[(&[u8], &[u8])]) -> Option<Disruption> {
        for (k, v) in headers {
            unsafe {
                (self.f().add_n_response_header)(self.tx, k.as_ptr(), k.len(), v.as_ptr(), v.len())
            };
        }
        let proto = c"HTTP 1.1";
        unsafe {
            (self.f().process_response_headers)(self.tx, c_int::from(status), proto.as_ptr())
        };
        self.disruption()
    }

    /// The response body, or its inspected part (phase 4).
    pub fn response_body(&mut self, body: &[u8]) -> Option<Disruption> {
        if !body.is_empty() {
            unsafe { (self.f().append_response_body)(self.tx, body.as_ptr(), body.len()) };
        }
        unsafe { (self.f().process_response_body)(self.tx) };
        self.disruption()
    }

    /// Phase 5 (CRS's correlation rules), then the messages of every rule that matched.
    pub fn finish(mut self) -> Vec<String> {
        unsafe { (self.f().process_logging)(self.tx) };
        std::mem::take(&mut *self.logs)
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        // SAFETY: the transaction was created by `new` and is freed once; the log vector it
        // points at is dropped after this.
        unsafe { (self.f().transaction_cleanup)(self.tx) };
    }
}
