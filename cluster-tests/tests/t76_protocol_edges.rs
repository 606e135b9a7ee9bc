//! Protocol edges found in review (issue 14, item 4), each against a real 3-node cluster
//! (`portcullis up`) with clients nobody here wrote: aioquic for HTTP/3
//! (`clients/h3_get.py`), python-h2 for HTTP/2 `:path` (`clients/edge_clients.py`), curl for
//! Host, forwarding headers, Set-Cookie and the plain-port redirect, raw sockets for the
//! per-IP limit and PROXY headers, a tonic client over TLS for the cluster port, and a raw
//! HTTP/1.1 backend (written here, on std sockets) that misbehaves on purpose and records every
//! request and connection it sees.
//!
//! Phases are logged; every wait polls a condition with a deadline instead of sleeping. The
//! Python clients need aioquic (pip) and python3-h2 (apt): `.ci/run` installs both. Without
//! them the phases that need them fail as root (CI must have them) and print a SKIP reason
//! otherwise.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_cluster_tests::harness::{phase, portcullis_bin, run, show, wait_for, TestCluster};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// One request the raw backend read (or began to read).
#[derive(Debug, Clone)]
struct Seen {
    conn: usize,
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    declared: Option<usize>,
    body: usize,
    /// The whole body arrived (as declared, or a complete chunked body).
    complete: bool,
}

/// A deliberately simple HTTP/1.1 backend on std sockets, one thread per connection.
///
/// - `/cookies`: four `Set-Cookie` fields, with `Domain`s above, equal to and without the host;
/// - `/signed-chunk`, `/negative-chunk`: a chunked body whose first size is `+5` / `-5`;
/// - anything else: `200` with `conn=<id> path=<target> body=<bytes>`.
struct RawBackend {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RawBackend {
    fn start(base: &str) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind raw backend");
        let port = l.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let conns = Arc::new(AtomicUsize::new(0));
        let (s, base) = (seen.clone(), base.to_string());
        std::thread::spawn(move || {
            for stream in l.incoming().flatten() {
                let id = conns.fetch_add(1, Ordering::SeqCst) + 1;
                let (s, base) = (s.clone(), base.clone());
                std::thread::spawn(move || serve_raw(stream, id, &s, &base));
            }
        });
        RawBackend { port, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reads a CRLF-terminated line (without the CRLF); `None` at end of stream.
fn read_line(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_string()),
    }
}

fn serve_raw(stream: TcpStream, conn: usize, seen: &Mutex<Vec<Seen>>, base: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut w = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(stream);
    loop {
        let Some(line) = read_line(&mut r) else {
            return;
        };
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = BTreeMap::new();
        loop {
            let Some(h) = read_line(&mut r) else {
                return;
            };
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let declared = headers
            .get("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let (body, complete) = if chunked {
            read_chunked(&mut r)
        } else {
            let want = declared.unwrap_or(0);
            let mut buf = vec![0u8; want];
            let mut got = 0;
            while got < want {
                match r.read(&mut buf[got..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            (got, got == want)
        };
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
            conn,
            method,
            path: path.clone(),
            headers,
            declared,
            body,
            complete,
        });
        if !complete {
            return;
        }
        let answer = match path.as_str() {
            "/cookies" => format!(
                "HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Domain={base}; Path=/\r\n\
                 Set-Cookie: b=2; domain=.localhost\r\nSet-Cookie: c=3; Domain=raw.{base}\r\n\
                 Set-Cookie: d=4; HttpOnly\r\nContent-Length: 2\r\n\r\nok"
            ),
            "/signed-chunk" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                 +5\r\nhello\r\n0\r\n\r\n"
                .to_string(),
            "/negative-chunk" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                 -5\r\nhello\r\n0\r\n\r\n"
                .to_string(),
            _ => {
                let text = format!("conn={conn} path={path} body={body}");
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                )
            }
        };
        if w.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A chunked request body: (bytes, complete).
fn read_chunked(r: &mut BufReader<TcpStream>) -> (usize, bool) {
    let mut total = 0;
    loop {
        let Some(line) = read_line(r) else {
            return (total, false);
        };
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (total, false);
        };
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                match read_line(r) {
                    None => return (total, false),
                    Some(l) if l.is_empty() => return (total, true),
                    Some(_) => {}
                }
            }
        }
        let mut buf = vec![0u8; size + 2];
        if r.read_exact(&mut buf).is_err() {
            return (total, false);
        }
        total += size;
    }
}

/// Stops the demo apps with the cluster (`portcullis down`) before the harness kills nodes.
struct Cluster {
    tc: TestCluster,
    base: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.tc.down();
    }
}

struct Curl {
    code: Option<i32>,
    status: u16,
    headers: String,
    body: String,
    stderr: String,
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.trim_ascii() == b"0"
}

/// A Python that imports `module`: Debian's (apt packages) may sit behind another `python3`
/// earlier on PATH, and pip's aioquic may be in that other one.
fn python_with(module: &str) -> Option<PathBuf> {
    ["/usr/bin/python3", "python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .args(["-c", &format!("import {module}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// The interpreter for `module`, or `None` after printing why its phases are skipped (never
/// as root: CI installs every client).
fn need_python(module: &str, install: &str) -> Option<PathBuf> {
    let py = python_with(module);
    if py.is_none() {
        assert!(
            !is_root(),
            "python3 cannot import {module}, and as root it must (.ci/run installs it: {install})"
        );
        eprintln!("SKIP the {module} phases: python3 cannot import {module} ({install})");
    }
    py
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not json ({e}): {l}")))
        .collect()
}

impl Cluster {
    fn up() -> Self {
        let tc = TestCluster::up(3);
        let text = std::fs::read_to_string(tc.path().join("cluster.json")).expect("cluster.json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let base = v["base_domain"].as_str().expect("base_domain").to_string();
        Cluster { tc, base }
    }

    fn host(&self, label: &str) -> String {
        format!("{label}.{}", self.base)
    }

    fn ca(&self) -> PathBuf {
        self.tc.path().join("pki/dev-ca.pem")
    }

    fn https_port(&self, node: u64) -> String {
        let addr = &self.tc.node(node).https_addr;
        addr.rsplit_once(':').expect("port").1.to_string()
    }

    /// curl to `https://<host>:<port><path>` on `node`: status, response headers, body.
    fn curl(&self, node: u64, host: &str, path: &str, extra: &[&str]) -> Curl {
        let port = self.https_port(node);
        let out = run(Command::new("curl")
            .args(["-sS", "--max-time", "15", "-D", "/dev/stderr", "-w"])
            .arg("\n%{http_code}")
            .arg("--cacert")
            .arg(self.ca())
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .args(extra)
            .arg(format!("https://{host}:{port}{path}")));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        Curl {
            code: out.status.code(),
            status: code.trim().parse().unwrap_or(0),
            headers: stderr.to_ascii_lowercase(),
            body: body.to_string(),
            stderr,
        }
    }

    /// The aioquic client (`h3_get.py`) against `node`: its exit code and JSON lines.
    fn h3(
        &self,
        py: &Path,
        node: u64,
        host: &str,
        extra: &[&str],
    ) -> (Option<i32>, Vec<serde_json::Value>) {
        let out = run(Command::new(py)
            .arg(clients_dir().join("h3_get.py"))
            .args(["--port", &self.https_port(node), "--host", host, "--cacert"])
            .arg(self.ca())
            .args(extra));
        (out.status.code(), json_lines(&out.stdout))
    }

    /// `edge_clients.py <args>` against `node` for `host`.
    fn edge_client(&self, py: &Path, node: u64, host: &str, args: &[&str]) -> serde_json::Value {
        let out = run(Command::new(py)
            .arg(clients_dir().join("edge_clients.py"))
            .args(args)
            .args(["--port", &self.https_port(node), "--host", host, "--ca"])
            .arg(self.ca()));
        assert!(
            out.status.success(),
            "edge_clients.py {args:?}: {}",
            show(&out)
        );
        serde_json::from_slice(&out.stdout).expect("client prints JSON")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.tc.cli(args);
        assert!(out.status.success(), "portcullis {args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Restarts node `id` with `[edge]` settings changed.
    fn restart_with(&mut self, id: u64, edge: &[(&str, toml::Value)]) {
        let path = self.tc.node(id).config.clone();
        let mut cfg: toml::Value =
            toml::from_str(&std::fs::read_to_string(&path).expect("config")).expect("toml");
        let table = cfg
            .get_mut("edge")
            .and_then(toml::Value::as_table_mut)
            .expect("[edge]");
        for (k, v) in edge {
            table.insert((*k).to_string(), v.clone());
        }
        self.tc.stop(id);
        std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write config");
        self.tc.start_node(id);
        let host = self.host("demo");
        wait_for(
            &format!("node {id} serves demo again"),
            Duration::from_secs(30),
            || (self.curl(id, &host, "/", &[]).status == 200).then_some(()),
        );
    }

    fn limit_rejections(&self, node: u64, reason: &str) -> u64 {
        let needle = format!("portcullis_edge_limit_rejections_total{{reason=\"{reason}\"}} ");
        self.tc
            .metrics(node)
            .lines()
            .find_map(|l| l.strip_prefix(&needle)?.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }
}

/// The `set-cookie` field values in a header dump (lowercased).
fn set_cookies(headers: &str) -> Vec<String> {
    headers
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie:"))
        .map(|v| v.trim().to_string())
        .collect()
}

fn assert_cookies_narrowed(what: &str, cookies: &[String], base: &str) {
    let base = base.to_ascii_lowercase();
    let want = [
        "a=1; path=/".to_string(),
        "b=2".to_string(),
        format!("c=3; domain=raw.{base}"),
        "d=4; httponly".to_string(),
    ];
    assert_eq!(cookies, want, "{what}");
}

/// Waits until the server closes `s`, for at most `within`: `true` if it did.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let _ = s.set_read_timeout(Some(within));
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Which of `conns` the server has closed by now (a read finds end of stream or an error).
fn closed_now(conns: &mut [TcpStream]) -> Vec<usize> {
    let mut closed = Vec::new();
    for (i, s) in conns.iter_mut().enumerate() {
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 16];
        let gone = match s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        let _ = s.set_nonblocking(false);
        if gone {
            closed.push(i);
        }
    }
    closed
}

/// Raw request bytes for gRPC calls with invalid protobuf, and replies as bytes.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        let mut v = vec![0u8; n];
        bytes::Buf::copy_to_slice(src, &mut v);
        Ok(Some(v))
    }
}

/// One unary call of `method` (`/package.Service/Method`) with `body` as the raw message bytes,
/// over TLS to `rpc` with `identity` (or none): the gRPC code, or the connect error.
async fn raw_rpc(
    ca: &str,
    rpc: &str,
    expect_node: u64,
    identity: Option<Identity>,
    method: &'static str,
    body: Vec<u8>,
) -> Result<tonic::Code, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(portcullis_raft::tls::node_server_name(expect_node));
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    let ch = Endpoint::from_shared(format!("https://{rpc}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut grpc = tonic::client::Grpc::new(ch)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    grpc.ready().await.map_err(|e| format!("ready: {e}"))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    match grpc
        .unary::<Vec<u8>, Vec<u8>, RawCodec>(tonic::Request::new(body), path, RawCodec)
        .await
    {
        Ok(_) => Ok(tonic::Code::Ok),
        Err(s) => {
            eprintln!("    {method}: {:?} {}", s.code(), s.message());
            Ok(s.code())
        }
    }
}

/// A protobuf `RegisterCvmRequest` (fields 1-5) encoded by hand.
fn register_request(
    app: &str,
    instance: &str,
    region: &str,
    key: &str,
    evidence: usize,
) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        out.push(tag << 3 | 2);
        let mut n = bytes.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::new();
    field(&mut out, 1, app.as_bytes());
    field(&mut out, 2, instance.as_bytes());
    field(&mut out, 3, region.as_bytes());
    field(&mut out, 4, key.as_bytes());
    if evidence > 0 {
        field(&mut out, 5, &vec![0x5a; evidence]);
    }
    out
}

fn wg_key() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

#[test]
fn t76_protocol_edges() {
    let h3_py = need_python(
        "aioquic",
        "python3 -m pip install --break-system-packages aioquic",
    );
    let h2_py = need_python("h2", "apt-get install python3-h2");

    phase("start a 3-node cluster with the demo app, and a raw backend as app `raw`");
    let mut c = Cluster::up();
    let backend = RawBackend::start(&c.base);
    let port = backend.port.to_string();
    c.cli_ok(&["app", "create", "raw", "--port", &port]);
    c.cli_ok(&[
        "cvm",
        "register",
        "--instance-id",
        "raw-box",
        "--app",
        "raw",
        "--region",
        "us-east",
        "--backend",
        "127.0.0.1",
    ]);
    let raw = c.host("raw");
    let demo = c.host("demo");
    for node in c.tc.ids() {
        wait_for(
            &format!("node {node} routes {raw}"),
            Duration::from_secs(10),
            || (c.curl(node, &raw, "/ready", &[]).status == 200).then_some(()),
        );
    }

    phase("item 7: `up` wrote the admin token 0600; a node refuses one group or others can read");
    {
        use std::os::unix::fs::PermissionsExt;
        let token = &c.tc.info.token_file;
        let mode = std::fs::metadata(token)
            .expect("token")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", token.display());
        let loose = c.tc.path().join("loose.token");
        std::fs::copy(token, &loose).expect("copy token");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let cfg = std::fs::read_to_string(&c.tc.node(1).config).expect("config");
        let mut v: toml::Value = toml::from_str(&cfg).expect("toml");
        v["admin"]["token_file"] = toml::Value::String(loose.display().to_string());
        // Node 1 is running: free ports, so the token check is what fails.
        v["admin"]["listen"] = "127.0.0.1:0".into();
        v["cluster"]["listen"] = "127.0.0.1:0".into();
        v["edge"]["https_listen"] = "127.0.0.2:0".into();
        v["edge"]["http_listen"] = "127.0.0.3:0".into();
        let path = c.tc.node(1).config.with_file_name("loose-token.toml");
        std::fs::write(&path, toml::to_string(&v).expect("toml")).expect("write");
        let out = run(Command::new(portcullis_bin())
            .args(["node", "--config"])
            .arg(&path));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "started with a 0644 token: {}",
            show(&out)
        );
        assert!(
            err.contains(&loose.display().to_string()) && err.contains("chmod 600"),
            "the error names the file and the fix: {}",
            show(&out)
        );
    }

    phase("item 1: HTTP/3 bodies that disagree with content-length are stream errors (aioquic)");
    if let Some(py) = &h3_py {
        for (path, args, what) in [
            (
                "/short",
                ["--body-bytes", "5", "--content-length", "10"],
                "5 bytes of a declared 10",
            ),
            (
                "/long",
                ["--body-bytes", "10", "--content-length", "5"],
                "10 bytes of a declared 5",
            ),
            (
                "/nobody",
                ["--body-bytes", "0", "--content-length", "10"],
                "FIN with the headers, 10 declared",
            ),
            (
                "/signed",
                ["--body-bytes", "5", "--content-length", "+5"],
                "content-length +5",
            ),
        ] {
            let mut a = vec!["--method", "POST", "--path", path];
            a.extend(args);
            let (code, lines) = c.h3(py, 1, &raw, &a);
            assert_eq!(code, Some(4), "{what}: {lines:?}");
            let err = lines
                .first()
                .and_then(|l| l["error"].as_str())
                .unwrap_or("");
            assert!(
                err.contains("0x10e"),
                "{what}: expected H3_MESSAGE_ERROR, got {lines:?}"
            );
        }
        // The same connection kinds keep working with honest lengths.
        let (code, lines) = c.h3(
            py,
            1,
            &raw,
            &["--method", "POST", "--path", "/honest", "--body-bytes", "5"],
        );
        assert_eq!(code, Some(0), "{lines:?}");
        assert!(
            lines[0]["body"].as_str().unwrap_or("").ends_with("body=5"),
            "{lines:?}"
        );
        // The backend never took a mismatched body for a complete request: /short and /long
        // may have reached it cut short (their connections then closed, never pooled), or not
        // at all (hyper gave up on the connection before flushing the head).
        for s in backend.seen() {
            if ["/short", "/long", "/nobody", "/signed"].contains(&s.path.as_str()) {
                assert!(
                    !s.complete,
                    "the backend got {} as a complete request: {s:?}",
                    s.path
                );
                // /nobody and /signed are refused before anything is sent.
                assert!(["/short", "/long"].contains(&s.path.as_str()), "{s:?}");
                assert!(
                    s.method == "POST" && s.declared.is_some_and(|d| s.body < d),
                    "{s:?}"
                );
            }
        }
        let honest = backend.seen().into_iter().find(|s| s.path == "/honest");
        assert!(
            honest
                .is_some_and(|s| s.complete
                    && s.headers.get("content-length").map(String::as_str) == Some("5")),
            "{:?}",
            backend.seen()
        );
        let (code, lines) = c.h3(py, 1, &raw, &["--path", "/after", "--count", "3"]);
        assert_eq!(code, Some(0), "{lines:?}");
        let seen = backend.seen();
        let short_conns: Vec<usize> = seen
            .iter()
            .filter(|s| s.path == "/short" || s.path == "/long")
            .map(|s| s.conn)
            .collect();
        for s in seen.iter().filter(|s| s.path == "/after") {
            assert!(
                s.complete && !short_conns.contains(&s.conn),
                "reused a short-body connection: {seen:?}"
            );
        }
    }

    phase("item 2: HTTP/2 and HTTP/3 :path must be origin-form (python-h2, aioquic)");
    if let Some(py) = &h2_py {
        // 400 from the gateway, or a stream reset where the HTTP/2 layer already refuses to
        // build a request from the target: either way nothing is proxied (checked below).
        for path in [
            "foo",
            "http://evil.example/x",
            "https://raw.example/",
            "*",
            "",
        ] {
            let r = c.edge_client(py, 1, &raw, &["h2-request", "--path", path]);
            eprintln!("    h2 :path {path:?}: {r}");
            assert!(
                r["status"] == 400 || r.get("reset").is_some(),
                ":path {path:?}: {r}"
            );
        }
        let r = c.edge_client(
            py,
            1,
            &raw,
            &["h2-request", "--method", "OPTIONS", "--path", "*"],
        );
        assert_eq!(r["status"], 200, "OPTIONS *: {r}");
        let r = c.edge_client(py, 1, &raw, &["h2-request", "--path", "/fine?x=1"]);
        assert_eq!(r["status"], 200, "{r}");
    }
    if let Some(py) = &h3_py {
        for path in ["foo", "http://evil.example/x"] {
            let (code, lines) = c.h3(py, 2, &raw, &["--path", path]);
            let refused = match code {
                Some(0) => lines[0]["status"] == 400,
                // Refused by the HTTP/3 layer before it became a request: not proxied either.
                Some(4) => true,
                _ => false,
            };
            assert!(refused, ":path {path:?} over HTTP/3: {code:?} {lines:?}");
        }
    }
    let targets: Vec<String> = backend.seen().iter().map(|s| s.path.clone()).collect();
    assert!(
        targets.iter().all(|p| p.starts_with('/') || p == "*"),
        "a non-origin-form target reached the backend: {targets:?}"
    );

    phase("item 3: no userinfo in the forwarded Host; X-Real-IP rewritten, X-Forwarded-Port dropped (curl)");
    let port1 = c.https_port(1);
    for flag in ["--http1.1", "--http2"] {
        let r = c.curl(
            1,
            &demo,
            "/who",
            &[
                flag,
                "-H",
                &format!("Host: alice:secret@{demo}:{port1}"),
                "-H",
                "X-Real-IP: 198.51.100.7",
                "-H",
                "X-Forwarded-Port: 1",
            ],
        );
        assert_eq!(r.status, 200, "{flag}: {} {}", r.body, r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("demo json");
        let h = &v["headers"];
        let want = format!("{demo}:{port1}");
        assert_eq!(h["host"], want.as_str(), "{flag}: {v}");
        assert_eq!(h["x-forwarded-host"], want.as_str(), "{flag}: {v}");
        assert!(
            !v.to_string().contains("secret"),
            "{flag}: userinfo reached the app: {v}"
        );
        assert_eq!(h["x-real-ip"], "127.0.0.1", "{flag}: {v}");
        assert!(h.get("x-forwarded-port").is_none(), "{flag}: {v}");
    }

    phase("item 9: Set-Cookie Domain above the app's host is narrowed on HTTP/1.1, 2 and 3");
    for flag in ["--http1.1", "--http2"] {
        let r = c.curl(2, &raw, "/cookies", &[flag]);
        assert_eq!(r.status, 200, "{flag}: {}", r.stderr);
        assert_cookies_narrowed(flag, &set_cookies(&r.headers), &c.base);
    }
    if let Some(py) = &h3_py {
        let (code, lines) = c.h3(py, 2, &raw, &["--path", "/cookies"]);
        assert_eq!(code, Some(0), "{lines:?}");
        // aioquic's client joins repeated fields with ", ".
        let joined = lines[0]["headers"]["set-cookie"]
            .as_str()
            .unwrap_or("")
            .to_ascii_lowercase();
        let cookies: Vec<String> = joined.split(", ").map(str::to_string).collect();
        assert_cookies_narrowed("HTTP/3", &cookies, &c.base);
    }

    phase("item 6: the plain port redirects only served hosts; ACME HTTP-01 still answered (curl)");
    let http = c.tc.node(1).http_addr.clone();
    let plain = |host: &str, path: &str| {
        let out = run(Command::new("curl")
            .args([
                "-sS",
                "-m",
                "10",
                "-w",
                "\n%{http_code} %{redirect_url}",
                "-H",
            ])
            .arg(format!("Host: {host}"))
            .arg(format!("http://{http}{path}")));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let got = plain(&demo, "/a?b=c");
    assert!(
        got.ends_with(&format!("308 https://{demo}:{}/a?b=c", c.https_port(1))),
        "{got}"
    );
    let got = plain(&raw, "/");
    assert!(got.contains("\n308 "), "a routed app is redirected: {got}");
    for host in ["evil.example", "a.b.example.org"] {
        let got = plain(host, "/login");
        assert!(got.ends_with("\n404 "), "{host}: {got}");
    }
    let got = plain("evil.example", "/.well-known/acme-challenge/tok");
    assert!(
        got.contains("no such challenge") && got.ends_with("\n404 "),
        "the ACME responder, not the unknown-host answer: {got}"
    );

    phase(
        "item 8: a backend's signed chunk size fails the response; that connection is not reused",
    );
    for path in ["/signed-chunk", "/negative-chunk"] {
        for flag in ["--http1.1", "--http2"] {
            let r = c.curl(3, &raw, path, &[flag]);
            assert!(
                r.code != Some(0) && !r.body.contains("hello"),
                "{path} {flag}: curl {:?} status {} body {:?}",
                r.code,
                r.status,
                r.body
            );
        }
    }
    for _ in 0..6 {
        assert_eq!(c.curl(3, &raw, "/after-chunk", &[]).status, 200);
    }
    let seen = backend.seen();
    for bad in seen
        .iter()
        .filter(|s| s.path == "/signed-chunk" || s.path == "/negative-chunk")
    {
        let later: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.conn == bad.conn && s.path == "/after-chunk")
            .collect();
        assert!(
            later.is_empty(),
            "the connection of {bad:?} was pooled: {later:?}"
        );
    }
    if let Some(py) = &h2_py {
        // Request side: hyper's chunked decoder refuses a sign as well.
        let data = format!(
            "POST /chunked-request HTTP/1.1\\r\\nHost: {raw}\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n+5\\r\\nhello\\r\\n0\\r\\n\\r\\n"
        );
        let r = c.edge_client(py, 3, &raw, &["raw-h1", "--data", &data]);
        let line = r["status_line"].as_str().unwrap_or("");
        assert!(line.starts_with("HTTP/1.1 400"), "{r}");
        assert!(
            !backend.seen().iter().any(|s| s.path == "/chunked-request"),
            "a signed request chunk reached the backend"
        );
    }

    phase("item 5: the cluster port refuses CVM credentials and no-certificate callers before decoding (tonic)");
    {
        let pki = c.tc.path().join("pki");
        let out = run(Command::new(portcullis_bin())
            .args(["cvm", "credential", "--pki"])
            .arg(&pki)
            .args(["--app", "raw", "--out"])
            .arg(c.tc.path().join("cvm-raw")));
        assert!(out.status.success(), "{}", show(&out));
        let read = |p: PathBuf| std::fs::read_to_string(p).expect("read pem");
        let ca = read(pki.join("ca.pem"));
        let cvm = Identity::from_pem(
            read(c.tc.path().join("cvm-raw/cert.pem")),
            read(c.tc.path().join("cvm-raw/key.pem")),
        );
        let node1 = Identity::from_pem(
            read(pki.join("node-1/cert.pem")),
            read(pki.join("node-1/key.pem")),
        );
        let rpc = c.tc.node(2).rpc_addr.clone();
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let call = |id: Option<Identity>, method: &'static str, body: Vec<u8>| {
            rt.block_on(raw_rpc(&ca, &rpc, 2, id, method, body))
        };
        // Not valid protobuf: a decoder that ran first would answer INTERNAL.
        let garbage = vec![0xff; 64];
        for m in [
            "/portcullis.cluster.v1.ClusterRpc/AppendEntries",
            "/portcullis.cluster.v1.ClusterRpc/Vote",
            "/portcullis.cluster.v1.ClusterRpc/Forward",
            "/portcullis.cluster.v1.ClusterRpc/Identity",
        ] {
            assert_eq!(
                call(Some(cvm.clone()), m, garbage.clone()),
                Ok(tonic::Code::PermissionDenied),
                "{m} with a CVM credential"
            );
        }
        // Also for a large message: refused at once, not after reading it.
        let started = Instant::now();
        assert_eq!(
            call(
                Some(cvm.clone()),
                "/portcullis.cluster.v1.ClusterRpc/AppendEntries",
                vec![0xff; 8 << 20]
            ),
            Ok(tonic::Code::PermissionDenied)
        );
        eprintln!(
            "    8 MiB append with a CVM credential refused in {:?}",
            started.elapsed()
        );
        // TLS 1.3: the client may finish its side before the server refuses the missing
        // certificate, so the refusal shows as a connect error or a failed call.
        let none = call(None, "/portcullis.cluster.v1.ClusterRpc/Identity", vec![]);
        eprintln!("    no client certificate: {none:?}");
        assert!(
            !matches!(none, Ok(tonic::Code::Ok)),
            "a caller without a certificate was answered"
        );
        // Nodes still pass, and per-method caps apply to them too.
        assert_eq!(
            call(
                Some(node1.clone()),
                "/portcullis.cluster.v1.ClusterRpc/Identity",
                vec![]
            ),
            Ok(tonic::Code::Ok)
        );
        assert_eq!(
            call(
                Some(node1.clone()),
                "/portcullis.cluster.v1.ClusterRpc/Vote",
                vec![0; 128 * 1024]
            ),
            Ok(tonic::Code::ResourceExhausted),
            "a 128 KiB vote"
        );
        assert_eq!(
            call(
                Some(node1),
                "/portcullis.cluster.v1.ClusterRpc/Forward",
                vec![0; 33 << 20]
            ),
            Ok(tonic::Code::ResourceExhausted),
            "a 33 MiB forward"
        );
        // The CVM registry stays reachable for CVM credentials, with a 16 KiB cap: the mount's
        // (RESOURCE_EXHAUSTED) or the service's own decoder limit (OUT_OF_RANGE), whichever
        // sees the size first.
        let register = "/portcullis.cluster.v1.CvmRegistry/Register";
        let big = call(
            Some(cvm.clone()),
            register,
            register_request("raw", "raw-big", "us-east", &wg_key(), 20 * 1024),
        );
        assert!(
            matches!(
                big,
                Ok(tonic::Code::ResourceExhausted | tonic::Code::OutOfRange)
            ),
            "a 20 KiB registration: {big:?}"
        );
        assert_eq!(
            call(
                Some(cvm),
                register,
                register_request("raw", "raw-cvm", "us-east", &wg_key(), 1024)
            ),
            Ok(tonic::Code::Ok),
            "a CVM registers with its credential"
        );
        let list = c.cli_ok(&["cvm", "list", "--json"]);
        assert!(
            list.contains("raw-cvm") && !list.contains("raw-big"),
            "{list}"
        );
    }

    phase("item 4: the per-IP limit counts silent connections from accept (raw sockets, node 3)");
    c.restart_with(
        3,
        &[
            ("max_connections_per_ip", 4.into()),
            ("client_hello_timeout_ms", 60_000.into()),
        ],
    );
    let https3 = c.tc.node(3).https_addr.clone();
    let before = c.limit_rejections(3, "connections_per_ip");
    let mut five: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(&https3).expect("connect"))
        .collect();
    let started = Instant::now();
    let closed = wait_for(
        "node 3 closes one of five silent connections",
        Duration::from_secs(10),
        || Some(closed_now(&mut five)).filter(|c| !c.is_empty()),
    );
    assert_eq!(closed.len(), 1, "closed {closed:?} of five");
    eprintln!(
        "    one of five silent connections closed {:?} after connect, without a byte sent",
        started.elapsed()
    );
    let mut sixth = TcpStream::connect(&https3).expect("connect");
    assert!(
        closed_by_server(&mut sixth, Duration::from_secs(10)),
        "a sixth connection was kept while four silent ones held the quota"
    );
    wait_for("node 3 counts the refusal", Duration::from_secs(5), || {
        (c.limit_rejections(3, "connections_per_ip") > before).then_some(())
    });
    assert_ne!(
        c.curl(3, &demo, "/", &[]).status,
        200,
        "a TLS client from the same address is over the quota too"
    );
    assert!(
        closed_now(&mut five).len() == 1,
        "the four charged ones stay open"
    );
    drop(five);
    wait_for(
        "node 3 serves 127.0.0.1 again",
        Duration::from_secs(10),
        || (c.curl(3, &demo, "/", &[]).status == 200).then_some(()),
    );

    phase("item 4: a trusted PROXY sender is charged per named client, right after the header (node 2)");
    c.restart_with(
        2,
        &[
            ("max_connections_per_ip", 4.into()),
            ("client_hello_timeout_ms", 60_000.into()),
            (
                "proxy_protocol_from",
                toml::Value::Array(vec!["127.0.0.1/32".into()]),
            ),
        ],
    );
    let https2 = c.tc.node(2).https_addr.clone();
    let proxied = |client: &str| {
        let mut s = TcpStream::connect(&https2).expect("connect");
        s.write_all(format!("PROXY TCP4 {client} 127.0.0.1 40000 443\r\n").as_bytes())
            .expect("proxy header");
        s
    };
    // Five at once: the worker threads take their headers in any order, so which one finds
    // the quota full is not known in advance; exactly one must be closed, with no ClientHello.
    let mut five: Vec<TcpStream> = (0..5).map(|_| proxied("203.0.113.7")).collect();
    let started = Instant::now();
    let closed = wait_for(
        "node 2 closes one of five connections for 203.0.113.7 after its header",
        Duration::from_secs(10),
        || Some(closed_now(&mut five)).filter(|c| !c.is_empty()),
    );
    assert_eq!(closed.len(), 1, "closed {closed:?} of five");
    eprintln!(
        "    refused right after its PROXY header, in {:?}",
        started.elapsed()
    );
    let mut sixth = proxied("203.0.113.7");
    assert!(
        closed_by_server(&mut sixth, Duration::from_secs(10)),
        "a sixth connection for 203.0.113.7 waited for its ClientHello"
    );
    assert!(
        closed_now(&mut five).len() == 1,
        "the four charged ones stay open"
    );
    // The balancer's own address is not capped by its clients: curl from 127.0.0.1 with its
    // own PROXY header, and without one, is served while 203.0.113.7 holds four slots.
    for extra in [&["--haproxy-protocol"][..], &[]] {
        let r = c.curl(2, &demo, "/", extra);
        assert_eq!(r.status, 200, "{extra:?}: {}", r.stderr);
    }
    drop(five);
}
