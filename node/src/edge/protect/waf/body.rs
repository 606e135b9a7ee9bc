//! Reading a body's first bytes for inspection, and a body that gives them back followed by
//! whatever was not read: a body larger than the inspected size is inspected in part and still
//! forwarded whole, streamed, without holding the rest in memory.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::edge::proxy::{BoxError, ProxyBody};

/// The first bytes of a body, and what is left of it.
pub struct Prefix<B> {
    /// Everything read: at least `limit` bytes when `over`, else the whole body.
    pub read: Bytes,
    /// The body after `read`; `None` once it ended.
    pub rest: Option<B>,
    /// More than `limit` bytes.
    pub over: bool,
}

/// Reads `body` until it ends or more than `limit` bytes arrived. Trailers end the reading (a
/// body with trailers is inspected up to them and they are not forwarded; gRPC-style trailers
/// on requests are rare, and a WAF-protected app opts into this).
pub async fn read_prefix<B>(mut body: B, limit: usize) -> Result<Prefix<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut buf = BytesMut::new();
    loop {
        if buf.len() > limit {
            return Ok(Prefix {
                read: buf.freeze(),
                rest: Some(body),
                over: true,
            });
        }
        match body.frame().await {
            None => {
                return Ok(Prefix {
                    read: buf.freeze(),
                    rest: None,
                    over: false,
                })
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
        }
    }
}

/// `read` first, then the rest of the body.
pub struct Replay<B> {
    read: Option<Bytes>,
    rest: Option<B>,
}

impl<B> Replay<B>
where
    B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub fn boxed(p: Prefix<B>) -> ProxyBody {
        let read = (!p.read.is_empty()).then_some(p.read);
        match (read, p.rest) {
            (None, None) => http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
            (Some(b), None) => http_body_util::Full::new(b)
                .map_err(|never| match never {})
                .boxed(),
            (read, rest) => Replay { read, rest }.boxed(),
        }
    }
}

impl<B> Body for Replay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = self.read.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match self.rest.as_mut() {
            None => Poll::Ready(None),
            Some(r) => Pin::new(r).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.read.as_ref().map_or(0, |b| b.len() as u64);
        let mut h = self
            .rest
            .as_ref()
            .map_or(SizeHint::with_exact(0), |r| r.size_hint());
        h.set_lower(h.lower().saturating_add(head));
        if let Some(u) = h.upper() {
            h.set_upper(u.saturating_add(head));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_over_the_limit_is_read_in_part_and_replayed_whole() {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..10)
            .map(|i| Ok(Frame::data(Bytes::from(vec![b'a' + i as u8; 1000]))))
            .collect();
        let body = http_body_util::StreamBody::new(futures::stream::iter(chunks));
        let p = read_prefix(body, 2500).await.expect("read");
        assert!(p.over);
        assert_eq!(
            p.read.len(),
            3000,
            "whole frames are read until past the limit"
        );
        let all = Replay::boxed(p).collect().await.expect("replay").to_bytes();
        assert_eq!(all.len(), 10_000);
        assert_eq!(&all[2999..3001], b"cd");

        let small = http_body_util::Full::new(Bytes::from_static(b"q=1"));
        let p = read_prefix(small, 2500).await.expect("read");
        assert!(!p.over && p.rest.is_none());
        assert_eq!(
            &Replay::boxed(p).collect().await.expect("c").to_bytes()[..],
            b"q=1"
        );
    }
}
