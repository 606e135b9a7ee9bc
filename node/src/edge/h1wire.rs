//! HTTP/1.1 on the wire, for the direct backend client (`super::h1client`): the request head
//! it writes, and the response heads and chunked bodies it reads (RFC 9112). Backends run
//! tenants' code, so every byte read here is untrusted: each parser is bounded and errors
//! rather than panics. Pure (`std`, `bytes`, `http`, `httparse`), so the fuzz crate compiles
//! this file alone (`node/fuzz`, target `h1_response`).

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

/// Response header fields accepted from a backend (hyper's client allows 100).
pub const MAX_HEADERS: usize = 128;
/// A response head larger than this is refused (hyper's client default is ~400 KiB).
pub const MAX_HEAD_BYTES: usize = 256 * 1024;
/// A chunk-size line or trailer block larger than this is refused.
pub const MAX_CHUNK_LINE: usize = 4096;
pub const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// `METHOD path HTTP/1.1`, the header fields, and the blank line.
pub fn encode_head(method: &Method, path_and_query: &str, headers: &HeaderMap) -> Vec<u8> {
    let mut size = method.as_str().len() + path_and_query.len() + 14;
    for (k, v) in headers {
        size += k.as_str().len() + v.len() + 4;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut cookies = 0;
    for (k, v) in headers {
        if k == header::COOKIE {
            cookies += 1;
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if cookies > 0 {
        // HTTP/2 and HTTP/3 clients may split Cookie into one field per pair; an HTTP/1.1
        // server expects one field, joined with "; " (RFC 9113 §8.2.3).
        out.extend_from_slice(b"cookie: ");
        for (i, v) in headers.get_all(header::COOKIE).iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// How the response body is delimited (RFC 9112 §6.3), and whether the connection can be
/// reused after it.
#[derive(Debug)]
pub enum Framing {
    Length {
        remaining: u64,
        reuse: bool,
    },
    Chunked {
        state: Chunk,
        reuse: bool,
    },
    /// Until the backend closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then a blank line.
    Trailers,
    Done,
}

impl Framing {
    pub fn complete(&self) -> bool {
        matches!(
            self,
            Framing::Length { remaining: 0, .. }
                | Framing::Chunked {
                    state: Chunk::Done,
                    ..
                }
        )
    }

    pub fn reusable(&self) -> bool {
        match self {
            Framing::Length { reuse, .. } | Framing::Chunked { reuse, .. } => *reuse,
            Framing::Close => false,
        }
    }
}

pub enum Parsed {
    Final(http::response::Parts, Framing),
    /// A 1xx other than 101 was consumed; another head follows.
    Informational,
    Partial,
}

pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut fields);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(e.to_string()),
    };
    let code = r.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| format!("status {code}"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Only requests that asked for an upgrade may get one, and they go through hyper.
        return Err("101 to a request that asked for no upgrade".into());
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Parsed::Informational);
    }
    let http11 = r.version == Some(1);
    // The field values point into the head; they are kept as slices of it, not copied.
    let offsets: Vec<(HeaderName, std::ops::Range<usize>)> = {
        let base = buf.as_ptr() as usize;
        let mut v = Vec::with_capacity(r.headers.len());
        for f in r.headers.iter() {
            let name = HeaderName::from_bytes(f.name.as_bytes())
                .map_err(|_| format!("field name {:?}", f.name))?;
            let start = f.value.as_ptr() as usize - base;
            v.push((name, start..start + f.value.len()));
        }
        v
    };
    let head = buf.split_to(len).freeze();
    // Room for the fields the edge adds to every response (HSTS, Alt-Svc, hyper's Date):
    // growing the map re-hashes every field, per request.
    let mut headers = HeaderMap::with_capacity(offsets.len() + 4);
    for (name, range) in offsets {
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| format!("value of {name}"))?;
        headers.append(name, value);
    }
    let framing = framing(status, http11, head_request, &headers)?;
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    parts.headers = headers;
    Ok(Parsed::Final(parts, framing))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// RFC 9112 §6.3, in its order.
fn framing(
    status: StatusCode,
    http11: bool,
    head_request: bool,
    headers: &HeaderMap,
) -> Result<Framing, String> {
    let reuse = if http11 {
        !has_token(headers, header::CONNECTION, "close")
    } else {
        has_token(headers, header::CONNECTION, "keep-alive")
    };
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length {
            remaining: 0,
            reuse,
        });
    }
    if let Some(last) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let chunked = last
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        // With both Transfer-Encoding and Content-Length the message may have been meant to
        // smuggle another: use it, then close (§6.3 item 3).
        let reuse = reuse && !headers.contains_key(header::CONTENT_LENGTH);
        return Ok(if chunked {
            Framing::Chunked {
                state: Chunk::Size,
                reuse,
            }
        } else {
            Framing::Close
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let part = part.trim();
            let n = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| format!("Content-Length {part:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values".into());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(remaining) => Framing::Length { remaining, reuse },
        None => Framing::Close,
    })
}

pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The state moved on without a frame to give.
    Progress,
    NeedMore,
}

/// One step of the chunked decoder (RFC 9112 §7.1) over what is buffered.
pub fn decode_chunk(buf: &mut BytesMut, state: &mut Chunk) -> Result<Decoded, String> {
    match *state {
        Chunk::Size => {
            let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err("chunk-size line too long".into());
                }
                return Ok(Decoded::NeedMore);
            };
            if nl > MAX_CHUNK_LINE {
                return Err("chunk-size line too long".into());
            }
            let line = &buf[..nl];
            let line = line
                .strip_suffix(b"\r")
                .ok_or("chunk-size line without CR")?;
            // Extensions (`;name=value`) are allowed and meaningless here.
            let digits = line.split(|&b| b == b';').next().unwrap_or_default();
            let digits = std::str::from_utf8(digits)
                .map_err(|_| "chunk size is not ASCII")?
                .trim_end_matches([' ', '\t']);
            // Hex digits only: `from_str_radix` would also take a sign (`+5`), which other
            // parsers on the path may read differently (RFC 9112 §7.1: `1*HEXDIG`).
            if digits.is_empty()
                || digits.len() > 15
                || !digits.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(format!("chunk size {digits:?}"));
            }
            let size =
                u64::from_str_radix(digits, 16).map_err(|_| format!("chunk size {digits:?}"))?;
            buf.advance(nl + 1);
            *state = if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            };
            Ok(Decoded::Progress)
        }
        Chunk::Data(remaining) => {
            if buf.is_empty() {
                return Ok(Decoded::NeedMore);
            }
            let n = (buf.len() as u64).min(remaining) as usize;
            let data = buf.split_to(n).freeze();
            *state = match remaining - n as u64 {
                0 => Chunk::DataEnd,
                left => Chunk::Data(left),
            };
            Ok(Decoded::Data(data))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Decoded::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            buf.advance(2);
            *state = Chunk::Size;
            Ok(Decoded::Progress)
        }
        Chunk::Trailers => {
            if buf.len() >= 2 && &buf[..2] == b"\r\n" {
                buf.advance(2);
                *state = Chunk::Done;
                return Ok(Decoded::Progress);
            }
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if buf.len() > MAX_TRAILER_BYTES {
                    return Err("trailer section too large".into());
                }
                return Ok(Decoded::NeedMore);
            };
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let parsed = httparse::parse_headers(&buf[..end + 4], &mut fields)
                .map_err(|e| format!("trailers: {e}"))?;
            let httparse::Status::Complete((_, fields)) = parsed else {
                return Err("trailers: incomplete".into());
            };
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| format!("trailer name {:?}", f.name))?;
                let value = HeaderValue::from_bytes(f.value)
                    .map_err(|_| format!("trailer value of {name}"))?;
                trailers.append(name, value);
            }
            buf.advance(end + 4);
            *state = Chunk::Done;
            Ok(Decoded::Trailers(trailers))
        }
        Chunk::Done => Ok(Decoded::Progress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cookies_are_joined_into_one_field() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        let head = String::from_utf8(encode_head(&Method::GET, "/", &h)).expect("ascii");
        assert_eq!(head.matches("cookie").count(), 1, "{head}");
        assert!(head.contains("\r\ncookie: a=1; b=2\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"));
    }

    #[test]
    fn chunk_decoder_handles_bytes_arriving_one_at_a_time() {
        let wire = b"4\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nA: b\r\n\r\n";
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut body = Vec::new();
        let mut trailers = None;
        for &b in wire.iter() {
            buf.extend_from_slice(&[b]);
            loop {
                match decode_chunk(&mut buf, &mut state).expect("valid") {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::Trailers(t) => trailers = Some(t),
                    Decoded::Progress if state != Chunk::Done => continue,
                    Decoded::Progress | Decoded::NeedMore => break,
                }
            }
        }
        assert_eq!(state, Chunk::Done);
        assert_eq!(body, b"wikipedia in\r\n\r\nchunks.");
        assert_eq!(trailers.expect("trailers")["a"], "b");
        assert!(buf.is_empty());
    }

    #[test]
    fn chunk_sizes_with_a_sign_or_other_non_hex_bytes_are_refused() {
        for line in [
            &b"+5\r\nhello\r\n0\r\n\r\n"[..],
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"+0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5_0\r\n",
        ] {
            let mut buf = BytesMut::from(line);
            let mut state = Chunk::Size;
            assert!(
                decode_chunk(&mut buf, &mut state).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(line)
            );
        }
        // Upper and lower case hex digits, and whitespace before an extension, still parse.
        for (line, size) in [(&b"aB\r\n"[..], 0xab), (b"10 ;x=y\r\n", 0x10)] {
            let mut buf = BytesMut::from(line);
            let mut state = Chunk::Size;
            decode_chunk(&mut buf, &mut state).expect("valid size line");
            assert_eq!(state, Chunk::Data(size));
        }
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        let ok = StatusCode::OK;
        let f = framing(
            ok,
            true,
            false,
            &h(&[
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "5"),
            ]),
        )
        .expect("te");
        assert!(
            matches!(f, Framing::Chunked { reuse: false, .. }),
            "TE with CL: used, then closed"
        );
        let f = framing(ok, true, false, &h(&[("transfer-encoding", "gzip")])).expect("te");
        assert!(
            matches!(f, Framing::Close),
            "a final coding other than chunked reads to close"
        );
        let f = framing(ok, true, false, &h(&[("content-length", "7, 7")])).expect("same values");
        assert!(matches!(
            f,
            Framing::Length {
                remaining: 7,
                reuse: true
            }
        ));
        assert!(framing(ok, true, false, &h(&[("content-length", "7, 8")])).is_err());
        assert!(framing(ok, true, false, &h(&[("content-length", "+7")])).is_err());
        let f = framing(
            ok,
            true,
            false,
            &h(&[("connection", "keep-alive, close"), ("content-length", "1")]),
        )
        .expect("close");
        assert!(!f.reusable());
        let f = framing(
            ok,
            false,
            false,
            &h(&[("connection", "keep-alive"), ("content-length", "1")]),
        )
        .expect("1.0");
        assert!(f.reusable());
        let f = framing(
            StatusCode::NOT_MODIFIED,
            true,
            false,
            &h(&[("content-length", "9")]),
        )
        .expect("304");
        assert!(f.complete());
    }
}
