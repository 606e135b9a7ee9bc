//! The admin bearer token, compared in constant time.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// Whether `presented` is the admin token.
pub(super) fn token_matches(presented: &str, token: &str) -> bool {
    presented.as_bytes().ct_eq(token.as_bytes()).into()
}

/// The gRPC interceptor's check: `authorization: Bearer <token>`.
pub(super) fn check_token(req: &Request<()>, token: &str) -> Result<(), Status> {
    let Some(value) = req.metadata().get("authorization") else {
        return Err(Status::unauthenticated(
            "missing bearer token (authorization: Bearer <token>)",
        ));
    };
    let presented = value
        .to_str()
        .unwrap_or("")
        .strip_prefix("Bearer ")
        .unwrap_or("");
    if token_matches(presented, token) {
        Ok(())
    } else {
        Err(Status::unauthenticated("invalid bearer token"))
    }
}
