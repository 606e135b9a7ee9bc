//! The plain HTTP/1.1 backend loop the benchmark drivers serve their fixed answers with.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use hyper::body::{Body, Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves every connection accepted on `listener` with `answer`, forever. No header-read
/// timeout: only the local proxies under test connect, and it would close their pooled
/// connections while other targets are being measured.
pub async fn serve_http1<F, Fut, B>(listener: TcpListener, answer: F)
where
    F: Fn(hyper::Request<Incoming>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<hyper::Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((s, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let some connections close first.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), hyper::service::service_fn(answer)),
        );
    }
}
