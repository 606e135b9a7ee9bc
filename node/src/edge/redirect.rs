//! The plain HTTP port: 308 to HTTPS for the hosts the gateway serves (a route or a
//! certificate covers them), 404 for any other; ACME HTTP-01 challenges are answered for every
//! host (and `.internal` names from trusted networks are proxied by the caller).

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::acme_hook::AcmeResponder;
use super::proxy::ProxyBody;

pub const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer on the plain port for `host` (normalized, without port). `served`: some route or
/// certificate covers `host`; only those get a redirect, so the port does not send anyone's
/// browser to HTTPS for names the gateway has nothing for (and cannot be used to make it
/// vouch for them).
pub fn respond<B>(
    req: &Request<B>,
    host: Option<&str>,
    served: bool,
    https_port: u16,
    acme: &dyn AcmeResponder,
) -> Response<ProxyBody> {
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix(ACME_PREFIX) {
        return match host.and_then(|h| acme.http01(h, token)) {
            Some(ka) => text(StatusCode::OK, ka),
            None => text(StatusCode::NOT_FOUND, "no such challenge\n"),
        };
    }
    let Some(host) = host else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing or malformed Host header\n",
        );
    };
    if !served {
        return text(StatusCode::NOT_FOUND, "no app is served at this host\n");
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = if https_port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{https_port}{pq}")
    };
    let Ok(value) = HeaderValue::from_str(&location) else {
        return text(
            StatusCode::BAD_REQUEST,
            "cannot build a redirect for this request\n",
        );
    };
    let mut r = text(
        StatusCode::PERMANENT_REDIRECT,
        format!("redirecting to {location}\n"),
    );
    r.headers_mut().insert(header::LOCATION, value);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::acme_hook::NoAcme;

    struct Fixed;
    impl AcmeResponder for Fixed {
        fn http01(&self, host: &str, token: &str) -> Option<String> {
            (host == "a.test" && token == "tok").then(|| "tok.thumb".to_string())
        }
    }

    fn req(uri: &str) -> Request<()> {
        Request::builder().uri(uri).body(()).expect("request")
    }

    #[test]
    fn redirects_keep_path_and_query() {
        let r = respond(&req("/x/y?z=1"), Some("a.test"), true, 8443, &NoAcme);
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()[header::LOCATION], "https://a.test:8443/x/y?z=1");
        let r = respond(&req("/"), Some("a.test"), true, 443, &NoAcme);
        assert_eq!(r.headers()[header::LOCATION], "https://a.test/");
        assert_eq!(
            respond(&req("/"), None, false, 443, &NoAcme).status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn hosts_the_gateway_does_not_serve_get_404_not_a_redirect() {
        let r = respond(&req("/x"), Some("elsewhere.example"), false, 443, &NoAcme);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.headers().get(header::LOCATION).is_none());
        // ACME HTTP-01 is answered whatever the host: the name may have neither route nor
        // certificate yet (that is what the order is for).
        let r = respond(
            &req("/.well-known/acme-challenge/tok"),
            Some("a.test"),
            false,
            443,
            &Fixed,
        );
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[test]
    fn acme_path_is_reserved() {
        assert_eq!(
            respond(
                &req("/.well-known/acme-challenge/tok"),
                Some("a.test"),
                true,
                443,
                &NoAcme
            )
            .status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(
                &req("/.well-known/acme-challenge/tok"),
                Some("a.test"),
                true,
                443,
                &Fixed
            )
            .status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(
                &req("/.well-known/acme-challenge/no"),
                Some("a.test"),
                true,
                443,
                &Fixed
            )
            .status(),
            StatusCode::NOT_FOUND
        );
    }
}
