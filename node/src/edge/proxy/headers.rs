//! What headers cross the proxy: hop-by-hop fields never do (either way); the forwarded headers
//! (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`, `Host`) are the gateway's own, built once per
//! connection where they can be; and a backend's `Set-Cookie` cannot set a cookie for a name
//! above its app's host.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For` and the start of `Forwarded` (`for=…;proto=…;host="`) for one client,
/// and the headers made from the authority its last request named: a keep-alive connection
/// names the same one every time, so they are built once, not per request.
pub struct ForwardedFor {
    xff: HeaderValue,
    forwarded_prefix: Vec<u8>,
    /// The authority, its `Host` / `X-Forwarded-Host` value and the whole `Forwarded`.
    last: std::sync::Mutex<Option<AuthorityHeaders>>,
}

#[derive(Clone)]
struct AuthorityHeaders {
    authority: Bytes,
    host: HeaderValue,
    forwarded: HeaderValue,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

impl ForwardedFor {
    pub(super) fn new(client: std::net::IpAddr, scheme: &str) -> Self {
        let ip = client.to_string();
        let forwarded_prefix = format!(
            "for={};proto={scheme};host=\"",
            ip_for_forwarded(&SocketAddr::new(client, 0))
        )
        .into_bytes();
        ForwardedFor {
            // An address's text is always a valid header value.
            xff: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded_prefix,
            last: Default::default(),
        }
    }

    fn authority_headers(&self, authority: &str) -> Option<AuthorityHeaders> {
        // Held for a comparison and a few reference-count bumps, never across an await.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = last
            .as_ref()
            .filter(|a| a.authority == authority.as_bytes())
        {
            return Some(a.clone());
        }
        let host = HeaderValue::from_str(authority).ok()?;
        let mut forwarded = Vec::with_capacity(self.forwarded_prefix.len() + authority.len() + 1);
        forwarded.extend_from_slice(&self.forwarded_prefix);
        forwarded.extend_from_slice(authority.as_bytes());
        forwarded.push(b'"');
        let forwarded = HeaderValue::from_maybe_shared(Bytes::from(forwarded)).ok()?;
        let a = AuthorityHeaders {
            authority: Bytes::copy_from_slice(authority.as_bytes()),
            host,
            forwarded,
        };
        *last = Some(a.clone());
        Some(a)
    }

    /// Sets the forwarded headers of a request for `authority` that came in over `scheme`:
    /// `X-Forwarded-For` and `X-Real-IP` name this client, `X-Forwarded-Proto` the scheme,
    /// `X-Forwarded-Host`, `Forwarded` and `Host` the authority. Whatever an untrusted client
    /// claims in these headers is replaced, not appended to, so backends can trust them.
    pub(super) fn apply(&self, h: &mut HeaderMap, scheme: &'static str, authority: &str) {
        h.insert(X_FORWARDED_FOR, self.xff.clone());
        // The same client in the field nginx-style backends read; a client's own value would
        // be believed there.
        h.insert(X_REAL_IP, self.xff.clone());
        // The client's port claim: the gateway does not vouch for it (the scheme says whether
        // the client came over TLS), so it is dropped rather than passed on.
        h.remove(X_FORWARDED_PORT);
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
        let Some(a) = self.authority_headers(authority) else {
            return;
        };
        h.insert(X_FORWARDED_HOST, a.host.clone());
        h.insert(FORWARDED, a.forwarded);
        h.insert(header::HOST, a.host);
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) never cross the proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most requests carry none of these: one pass over their few names is cheaper than a hash
    // lookup per hop-by-hop name.
    let present = headers
        .keys()
        .any(|k| k == header::UPGRADE || HOP_BY_HOP.contains(k));
    if !present {
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !(keep_upgrade && s == "upgrade"))
        .filter_map(|s| HeaderName::from_bytes(s.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP.iter() {
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Narrows `Set-Cookie` fields whose `Domain` is a suffix above `authority`'s host (a base
/// domain, or any parent of the app's own name): every other app under that name would get
/// the cookie. The attribute is removed, which makes the cookie host-only, for the app's own
/// host. A `Domain` equal to the host stays; one that is no suffix of it is left for the
/// browser to refuse.
pub(super) fn narrow_cookie_domains(headers: &mut HeaderMap, authority: &str) {
    if !headers.contains_key(header::SET_COOKIE) {
        return;
    }
    let Ok(a) = authority.parse::<http::uri::Authority>() else {
        return;
    };
    let host = a.host().trim_end_matches('.').to_ascii_lowercase();
    let narrowed: Vec<Option<HeaderValue>> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| narrow_cookie(v.as_bytes(), &host))
        .collect();
    if narrowed.iter().all(Option::is_none) {
        return;
    }
    let old: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for (v, n) in old.into_iter().zip(narrowed) {
        headers.append(header::SET_COOKIE, n.unwrap_or(v));
    }
}

/// `cookie` without its `Domain` attributes that name a parent of `host`; `None` when it has
/// none.
fn narrow_cookie(cookie: &[u8], host: &str) -> Option<HeaderValue> {
    let mut out = Vec::with_capacity(cookie.len());
    let mut dropped = false;
    for (i, part) in cookie.split(|&b| b == b';').enumerate() {
        if i > 0 {
            let attr = part.trim_ascii_start();
            let (name, value) = match attr.iter().position(|&b| b == b'=') {
                Some(eq) => (&attr[..eq], &attr[eq + 1..]),
                None => (attr, &b""[..]),
            };
            if name.trim_ascii().eq_ignore_ascii_case(b"domain") {
                let value = value.trim_ascii();
                let value = value.strip_prefix(b".").unwrap_or(value);
                let value = value
                    .strip_suffix(b".")
                    .unwrap_or(value)
                    .to_ascii_lowercase();
                let above = host.len() > value.len()
                    && !value.is_empty()
                    && host.as_bytes().ends_with(&value)
                    && host.as_bytes()[host.len() - value.len() - 1] == b'.';
                if above {
                    dropped = true;
                    continue;
                }
            }
            out.push(b';');
        }
        out.extend_from_slice(part);
    }
    if !dropped {
        return None;
    }
    HeaderValue::from_bytes(&out).ok()
}

fn ip_for_forwarded(addr: &SocketAddr) -> String {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_domains_above_the_app_are_narrowed_to_its_host() {
        let host = "shop.apps.example";
        let narrow = |c: &str| {
            narrow_cookie(c.as_bytes(), host).map(|v| v.to_str().expect("ascii").to_string())
        };
        // The base domain, a parent, with a leading dot, any case: the Domain goes.
        assert_eq!(
            narrow("sid=1; Path=/; Domain=apps.example; Secure").as_deref(),
            Some("sid=1; Path=/; Secure")
        );
        assert_eq!(narrow("a=b; domain=.APPS.example").as_deref(), Some("a=b"));
        assert_eq!(narrow("a=b;Domain=example").as_deref(), Some("a=b"));
        assert_eq!(
            narrow("a=b; Domain = apps.example. ").as_deref(),
            Some("a=b")
        );
        // The app's own host, no Domain, an unrelated or a deeper name: left as they are.
        for keep in [
            "a=b; Domain=shop.apps.example",
            "a=b; Domain=.Shop.Apps.Example",
            "a=b; Path=/",
            "a=b; Domain=other.example",
            "a=b; Domain=x.shop.apps.example",
            "a=b; Domain=hop.apps.example",
            "a=b; Domain=",
            "domain=apps.example",
        ] {
            assert_eq!(narrow(keep), None, "{keep}");
        }

        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("a=1; Domain=apps.example"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("b=2; HttpOnly"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("c=3; Domain=shop.apps.example"),
        );
        narrow_cookie_domains(&mut h, "Shop.apps.example:8443");
        let all: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(
            all,
            ["a=1", "b=2; HttpOnly", "c=3; Domain=shop.apps.example"]
        );
    }
}
