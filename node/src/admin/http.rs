//! The admin port's router: gRPC and the HTTP probes on one listener, and serving it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use portcullis_proto::admin::admin_server::AdminServer;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use super::auth::check_token;
use super::grpc::AdminService;
use super::internal::{internal_names, InternalRoute};
use super::AdminState;

/// Builds the router for the admin port. gRPC calls must carry `authorization: Bearer <token>`;
/// the probe and metrics paths are unauthenticated because the listener is local-only.
pub fn router(state: AdminState, token: String) -> axum::Router {
    let token = Arc::new(token);
    let counted = state.metrics.clone();
    let internal = InternalRoute {
        edge: state.edge.clone(),
        token: token.clone(),
    };
    let svc = AdminServer::with_interceptor(
        AdminService {
            state: state.clone(),
        },
        move |req: Request<()>| {
            check_token(&req, &token)?;
            Ok(req)
        },
    );
    let grpc = tonic::service::Routes::new(svc)
        .prepare()
        .into_axum_router();
    let http = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    grpc.merge(http)
        .layer(axum::middleware::from_fn_with_state(
            internal,
            internal_names,
        ))
        .layer(axum::middleware::from_fn_with_state(counted, count_request))
}

/// Counts every request the admin listener answers, so a test (or an operator) can tell that
/// nothing from the data plane ever reached it.
async fn count_request(
    State(m): State<Arc<crate::metrics::Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    m.admin_requests.inc();
    next.run(req).await
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // gRPC answers are several small writes (headers, data, trailers); with Nagle on, the
    // last waits for the client's delayed ACK (~40 ms) and shows up as write latency.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "admin: TCP_NODELAY not set");
        }
    });
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let m = s.cluster.metrics();
    let member = m
        .membership_config
        .membership()
        .get_node(&s.cluster.id)
        .is_some();
    let ready = s.ready.load(std::sync::atomic::Ordering::Acquire);
    match (ready, member, m.current_leader) {
        (true, true, Some(l)) => (StatusCode::OK, format!("ready; leader {l}\n")),
        (false, _, _) => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string()),
        (_, false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not a cluster member yet\n".to_string(),
        ),
        (_, _, None) => (StatusCode::SERVICE_UNAVAILABLE, "no leader\n".to_string()),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let m = s.cluster.metrics();
    match s.metrics.render(&m) {
        Ok(body) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("metrics: {e}\n"),
        ),
    }
}
