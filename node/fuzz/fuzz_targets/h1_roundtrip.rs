#![no_main]
//! HTTP/1.1 heads both ways, from parts the `http` crate accepts:
//! - a request head written by `encode_head` (what the direct client sends a backend) parses
//!   back, with httparse (hyper's parser), to the same method, target and fields, the split
//!   `Cookie` fields joined into one;
//! - a response head with those fields parses with `parse_head` to the same status and fields.
use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue, COOKIE};
use http::uri::PathAndQuery;
use http::{Method, StatusCode};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::h1wire::{encode_head, parse_head, Parsed, MAX_HEADERS};

/// Field values lose their surrounding whitespace on the wire (RFC 9110 §5.5).
fn ows_trimmed(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

fn fields(u: &mut Unstructured<'_>) -> Result<Vec<(HeaderName, HeaderValue)>> {
    const COMMON: [&str; 6] = [
        "cookie",
        "host",
        "x-forwarded-for",
        "content-type",
        "via",
        "a",
    ];
    let n = u.int_in_range(0..=24)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name = if u.arbitrary()? {
            HeaderName::from_static(u.choose(&COMMON)?)
        } else {
            match HeaderName::from_bytes(u.arbitrary::<&[u8]>()?) {
                Ok(n) => n,
                Err(_) => continue,
            }
        };
        let Ok(value) = HeaderValue::from_bytes(u.arbitrary::<&[u8]>()?) else {
            continue;
        };
        out.push((name, value));
    }
    Ok(out)
}

fn request(u: &mut Unstructured<'_>) -> Result<()> {
    let method = if u.arbitrary()? {
        u.choose(&[Method::GET, Method::HEAD, Method::DELETE, Method::OPTIONS])?
            .clone()
    } else {
        match Method::from_bytes(u.arbitrary::<&[u8]>()?) {
            Ok(m) => m,
            Err(_) => return Ok(()),
        }
    };
    let Ok(path) = PathAndQuery::try_from(u.arbitrary::<&[u8]>()?) else {
        return Ok(());
    };
    let mut headers = HeaderMap::new();
    for (k, v) in fields(u)? {
        headers.append(k, v);
    }
    let head = encode_head(&method, path.as_str(), &headers);

    let mut parsed = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut parsed);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(len)) => assert_eq!(len, head.len()),
        other => panic!("{other:?} for {:?}", String::from_utf8_lossy(&head)),
    }
    assert_eq!(req.method, Some(method.as_str()));
    assert_eq!(req.path, Some(path.as_str()));
    assert_eq!(req.version, Some(1));
    // Every field in the map's order, then the cookies as one field.
    let mut expected: Vec<(&str, Vec<u8>)> = headers
        .iter()
        .filter(|(k, _)| **k != COOKIE)
        .map(|(k, v)| (k.as_str(), ows_trimmed(v.as_bytes()).to_vec()))
        .collect();
    let cookies: Vec<&[u8]> = headers
        .get_all(COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if !cookies.is_empty() {
        expected.push(("cookie", ows_trimmed(&cookies.join(&b"; "[..])).to_vec()));
    }
    let got: Vec<(&str, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name, h.value.to_vec()))
        .collect();
    assert_eq!(got, expected);
    Ok(())
}

fn response(u: &mut Unstructured<'_>) -> Result<()> {
    let Ok(status) = StatusCode::from_u16(u.int_in_range(100..=999)?) else {
        return Ok(());
    };
    let fields = fields(u)?;
    let mut head = format!("HTTP/1.1 {} Reason\r\n", status.as_u16()).into_bytes();
    let mut expected = HeaderMap::new();
    for (k, v) in &fields {
        head.extend_from_slice(k.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
        let trimmed = HeaderValue::from_bytes(ows_trimmed(v.as_bytes())).expect("still valid");
        expected.append(k.clone(), trimmed);
    }
    head.extend_from_slice(b"\r\n");
    assert!(fields.len() <= MAX_HEADERS);
    let mut buf = BytesMut::from(&head[..]);
    match parse_head(&mut buf, false) {
        Ok(Parsed::Final(parts, _)) => {
            assert!(!status.is_informational());
            assert_eq!(parts.status, status);
            assert_eq!(parts.version, http::Version::HTTP_11);
            assert_eq!(parts.headers, expected);
            assert!(buf.is_empty(), "the head is consumed");
        }
        Ok(Parsed::Informational) => {
            assert!(status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS);
            assert!(buf.is_empty(), "the head is consumed");
        }
        Ok(Parsed::Partial) => panic!("a whole head is partial"),
        // 101 is refused, and so is a Content-Length that is not one number.
        Err(e) => assert!(
            status == StatusCode::SWITCHING_PROTOCOLS
                || expected.contains_key(http::header::CONTENT_LENGTH),
            "{e} for {:?}",
            String::from_utf8_lossy(&head)
        ),
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = if u.arbitrary().unwrap_or(false) {
        request(&mut u)
    } else {
        response(&mut u)
    };
});
