//! The configuration text of the peers Portcullis is measured beside: nginx and HAProxy, each
//! terminating TLS with the same certificate and proxying to the same backend, set up to do the
//! same work as Portcullis (workers and pinning, forwarded and response headers, access logs).

use std::net::SocketAddr;
use std::path::Path;

use super::target::{Pki, APP};

/// How the proxies run: the peers through their configuration, Portcullis through the flags of
/// `portcullis up`.
#[derive(Clone, Copy, Debug)]
pub struct ProxyOptions {
    /// nginx worker processes and HAProxy threads.
    pub workers: usize,
    /// Pin one worker per core (nginx `worker_cpu_affinity auto`, HAProxy `cpu-map`,
    /// Portcullis `edge.pin_workers`).
    pub pin: bool,
    /// Per-request access logs on, for every proxy.
    pub access_log: bool,
    /// Let nginx and HAProxy skip the headers Portcullis adds by default.
    pub minimal_headers: bool,
}

/// nginx's configuration: `listen` with TLS (HTTP/1.1 and HTTP/2), proxying to `backend` over
/// HTTP/1.1 keep-alive; its pid file, logs and temp files under `dir`.
pub fn nginx_conf(
    dir: &Path,
    listen: SocketAddr,
    backend: SocketAddr,
    pki: &Pki,
    o: &ProxyOptions,
) -> String {
    let workers = o.workers;
    let affinity = if o.pin {
        "worker_cpu_affinity auto;"
    } else {
        ""
    };
    let d = dir.display();
    let access = if o.access_log {
        format!("access_log {d}/access.log;")
    } else {
        "access_log off;".into()
    };
    // Running as root (this machine), nginx would switch its workers to `nobody`, who cannot
    // enter the private temp directory; the user does not change what is measured.
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let user = if root { "user root;" } else { "" };
    let port = listen.port();
    let same = if o.minimal_headers {
        String::new()
    } else {
        format!(
            r#"proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header Forwarded "for=$remote_addr;proto=https;host=\"$http_host\"";
            add_header Strict-Transport-Security "max-age=31536000" always;
            add_header Alt-Svc 'h3=":{port}"; ma=86400' always;"#
        )
    };
    format!(
        r#"{user}
worker_processes {workers};
{affinity}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    {access}
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # nginx closes a client connection after 1000 requests by default; Portcullis and HAProxy
    # do not, and the keep-alive modes measure proxying, not reconnecting.
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    upstream backend {{
        server {backend};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen {listen} ssl http2;
        server_name {APP}.portcullis.localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            {same}
        }}
    }}
}}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
    )
}

/// HAProxy's configuration: `listen` with TLS (`pem`: certificate and key in one file), proxying
/// to `backend` over HTTP/1.1 keep-alive.
pub fn haproxy_conf(
    listen: SocketAddr,
    backend: SocketAddr,
    pem: &Path,
    o: &ProxyOptions,
) -> String {
    let workers = o.workers;
    // Thread i on CPU i - 1, as Portcullis pins worker i to the i-th CPU it may use: the same
    // CPUs wherever the bench may use CPUs 0 to workers - 1, as on the machines it runs on.
    let affinity = if o.pin {
        format!("cpu-map auto:1/1-{workers} 0-{}", workers.saturating_sub(1))
    } else {
        String::new()
    };
    let (log_global, log_defaults) = if o.access_log {
        (
            "log stdout format raw local0",
            "log global\n    option httplog",
        )
    } else {
        ("", "")
    };
    let port = listen.port();
    let same = if o.minimal_headers {
        String::new()
    } else {
        format!(
            r#"http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header Forwarded "for=%[src];proto=https;host=\"%[req.hdr(host)]\""
    http-response set-header Strict-Transport-Security "max-age=31536000"
    http-response set-header Alt-Svc "h3=\":{port}\"; ma=86400""#
        )
    };
    format!(
        r#"global
    nbthread {workers}
    {affinity}
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.2
    {log_global}
defaults
    mode http
    {log_defaults}
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    option http-keep-alive
    http-reuse always
frontend fe
    bind {listen} ssl crt {pem} alpn h2,http/1.1
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    {same}
    default_backend be
backend be
    server b1 {backend}
"#,
        pem = pem.display(),
    )
}

/// `configured`, or the number of cores (nginx's `worker_processes auto`, Portcullis's tokio
/// runtime).
pub fn workers(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    })
}
