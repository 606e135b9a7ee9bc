//! The demo app's checkable bulk data: `GET /bytes?n=N` streams N bytes of a fixed pattern, and
//! `POST /bytes` reads a body and says whether it is that pattern from its first byte.
//!
//! Tests and operators use it to prove that large transfers through the gateway and the tunnel
//! arrive whole, in order and unchanged: the pattern never repeats within 2^64 words, so a
//! dropped, duplicated or misplaced segment shows up as the first mismatching offset (a
//! repeating pattern could hide a segment delivered at the wrong offset).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::body::{full, Body};

/// Bytes per response frame.
const FRAME: usize = 64 * 1024;
/// Largest download one request may ask for (a demo app is not a disk-filling tool).
pub const MAX_BYTES: u64 = 64 << 30;

/// The 8-byte word at word index `i`: splitmix64, so neighbouring words are unrelated.
fn word(i: u64) -> [u8; 8] {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Fills `buf` with the pattern's bytes from stream offset `offset` on.
pub fn fill(offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut out = 0;
    while out < buf.len() {
        let w = word(pos / 8);
        let skip = (pos % 8) as usize;
        let n = (8 - skip).min(buf.len() - out);
        buf[out..out + n].copy_from_slice(&w[skip..skip + n]);
        out += n;
        pos += n as u64;
    }
}

/// Compares `data` with the pattern at `offset`; the offset of the first differing byte.
pub fn first_mismatch(offset: u64, data: &[u8]) -> Option<u64> {
    let mut want = vec![0u8; data.len()];
    fill(offset, &mut want);
    data.iter()
        .zip(&want)
        .position(|(a, b)| a != b)
        .map(|i| offset + i as u64)
}

/// `GET /bytes?n=N`: N pattern bytes, with their length announced.
pub fn download(n: u64) -> Response<Body> {
    let n = n.min(MAX_BYTES);
    let stream = futures::stream::unfold(0u64, move |sent| async move {
        if sent >= n {
            return None;
        }
        let len = (n - sent).min(FRAME as u64) as usize;
        let mut buf = vec![0u8; len];
        fill(sent, &mut buf);
        let frame = Frame::data(Bytes::from(buf));
        Some((Ok(frame), sent + len as u64))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    r
}

/// `POST /bytes`: reads the body frame by frame (never all of it at once) and answers
/// `{"bytes": N, "mismatch_at": null}` or the first offset that is not the pattern.
pub async fn verify(mut body: Incoming) -> Response<Body> {
    let mut seen = 0u64;
    let mut mismatch = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return full(
                StatusCode::BAD_REQUEST,
                format!("body read failed after {seen} bytes\n"),
                "text/plain",
            );
        };
        if let Some(data) = frame.data_ref() {
            if mismatch.is_none() {
                mismatch = first_mismatch(seen, data);
            }
            seen += data.len() as u64;
        }
    }
    let json = serde_json::json!({ "bytes": seen, "mismatch_at": mismatch });
    full(StatusCode::OK, format!("{json}\n"), "application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_the_same_stream_at_any_offset_and_split() {
        let mut whole = vec![0u8; 1000];
        fill(0, &mut whole);
        for (start, len) in [(0, 1), (3, 17), (8, 8), (9, 500), (999, 1)] {
            let mut part = vec![0u8; len];
            fill(start as u64, &mut part);
            assert_eq!(part, whole[start..start + len], "at {start}+{len}");
        }
    }

    #[test]
    fn a_misplaced_or_changed_byte_is_found() {
        let mut data = vec![0u8; 4096];
        fill(0, &mut data);
        assert_eq!(first_mismatch(0, &data), None);
        assert_eq!(first_mismatch(8, &data[8..]), None);
        // A segment delivered at the wrong offset.
        assert_eq!(first_mismatch(1400, &data[..1400]), Some(1400));
        data[2048] ^= 1;
        assert_eq!(first_mismatch(0, &data), Some(2048));
    }
}
