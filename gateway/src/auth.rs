//! The optional bearer-token check of the gateway's KServe ports
//! (`--auth-token-file`).
//!
//! Every request must carry `authorization: Bearer <token>`, as gRPC
//! metadata or as an HTTP header, except the server liveness and readiness
//! checks, which Kubernetes probes call without credentials. The check runs
//! before any handler, so a method or route added later is protected unless
//! it is added to the exempt lists here.

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use http::StatusCode;
use http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use subtle::ConstantTimeEq;
use tonic::server::NamedService;

/// gRPC methods callable without the token: the KServe liveness and
/// readiness checks. `grpc.health.v1` and reflection are separate services
/// that the check does not wrap, so they are open too.
pub const OPEN_GRPC_METHODS: &[&str] = &[
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
];

/// HTTP paths callable without the token: the KServe liveness and readiness checks.
pub const OPEN_HTTP_PATHS: &[&str] = &["/v2/health/live", "/v2/health/ready"];

/// The secret every protected request must present. Its `Debug` output
/// hides the value.
#[derive(Clone)]
pub struct BearerToken(Arc<[u8]>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BearerToken(<redacted>)")
    }
}

/// A token file that cannot be used. The messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("--auth-token-file {path}: failed to read the file: {source}")]
    Read {
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is empty or contains only line breaks.
    #[error("--auth-token-file {path}: the file is empty, expected a token on its first line")]
    Empty {
        /// The file.
        path: String,
    },
    /// The token contains a byte that cannot appear in a bearer token.
    #[error(
        "--auth-token-file {path}: byte {offset} of the token is not visible ASCII; \
         expected printable characters without spaces or line breaks, for example base64 or hex"
    )]
    InvalidByte {
        /// The file.
        path: String,
        /// Offset of the first bad byte.
        offset: usize,
    },
}

/// Reason a request was rejected. The text is the message the client receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No `authorization` header or metadata.
    #[error("missing authorization: expected the header `authorization: Bearer <token>`")]
    Missing,
    /// The header does not use the `Bearer` scheme.
    #[error("unsupported authorization scheme: expected `Bearer <token>`")]
    NotBearer,
    /// The token does not match.
    #[error("invalid bearer token")]
    Mismatch,
}

impl BearerToken {
    /// Reads the token from `path`; line breaks at the end are dropped.
    pub fn load(path: &Path) -> Result<BearerToken, TokenFileError> {
        let contents = std::fs::read(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        BearerToken::parse(&contents, path)
    }

    fn parse(contents: &[u8], path: &Path) -> Result<BearerToken, TokenFileError> {
        let end = contents
            .iter()
            .rposition(|&byte| byte != b'\n' && byte != b'\r')
            .map_or(0, |last| last + 1);
        let token = &contents[..end];
        if token.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.display().to_string(),
            });
        }
        if let Some(offset) = token.iter().position(|byte| !byte.is_ascii_graphic()) {
            return Err(TokenFileError::InvalidByte {
                path: path.display().to_string(),
                offset,
            });
        }
        Ok(BearerToken(Arc::from(token)))
    }

    /// Checks an `authorization` value against the token. The comparison
    /// takes the same time wherever the first differing byte is, but it
    /// does not hide the token's length.
    pub fn check(&self, authorization: Option<&HeaderValue>) -> Result<(), Rejection> {
        let value = authorization.ok_or(Rejection::Missing)?.as_bytes();
        // The scheme name is case-insensitive (RFC 9110, section 11.1).
        let scheme = b"bearer ";
        if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Err(Rejection::NotBearer);
        }
        let presented = value[scheme.len()..].trim_ascii();
        if bool::from(presented.ct_eq(&self.0)) {
            Ok(())
        } else {
            Err(Rejection::Mismatch)
        }
    }
}

/// A gRPC service wrapper that returns UNAUTHENTICATED, without calling
/// `inner`, for any call outside [`OPEN_GRPC_METHODS`] that lacks the token.
#[derive(Clone)]
pub struct RequireToken<S> {
    inner: S,
    token: BearerToken,
}

impl<S> RequireToken<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, token: BearerToken) -> Self {
        RequireToken { inner, token }
    }
}

impl<S: NamedService> NamedService for RequireToken<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for RequireToken<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path();
        if OPEN_GRPC_METHODS.contains(&method) {
            return Box::pin(self.inner.call(request));
        }
        match self.token.check(request.headers().get(AUTHORIZATION)) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(rejection) => {
                tracing::debug!(method, reason = ?rejection, "gRPC call rejected: bearer token check failed");
                let response = tonic::Status::unauthenticated(rejection.to_string()).into_http();
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}

/// Rejects, as axum middleware, any request outside [`OPEN_HTTP_PATHS`]
/// that lacks the token, with status 401 and a KServe error body.
pub async fn require_token_http(State(token): State<BearerToken>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if OPEN_HTTP_PATHS.contains(&path) {
        return next.run(request).await;
    }
    match token.check(request.headers().get(AUTHORIZATION)) {
        Ok(()) => next.run(request).await,
        Err(rejection) => {
            tracing::debug!(path, reason = ?rejection, "HTTP request rejected: bearer token check failed");
            let body = Json(serde_json::json!({ "error": rejection.to_string() }));
            (StatusCode::UNAUTHORIZED, [(WWW_AUTHENTICATE, "Bearer")], body).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(contents: &str) -> BearerToken {
        BearerToken::parse(contents.as_bytes(), Path::new("token")).unwrap()
    }

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    #[test]
    fn right_token_passes() {
        let token = token("s3cret-token");
        assert_eq!(token.check(Some(&header("Bearer s3cret-token"))), Ok(()));
    }

    #[test]
    fn scheme_is_case_insensitive() {
        let token = token("s3cret-token");
        assert_eq!(token.check(Some(&header("bearer s3cret-token"))), Ok(()));
        assert_eq!(token.check(Some(&header("BEARER  s3cret-token "))), Ok(()));
    }

    #[test]
    fn missing_header_is_rejected() {
        assert_eq!(token("abc").check(None), Err(Rejection::Missing));
    }

    #[test]
    fn other_scheme_is_rejected() {
        let token = token("abc");
        assert_eq!(token.check(Some(&header("Basic abc"))), Err(Rejection::NotBearer));
        assert_eq!(token.check(Some(&header("abc"))), Err(Rejection::NotBearer));
        assert_eq!(token.check(Some(&header("Bearer"))), Err(Rejection::NotBearer));
    }

    #[test]
    fn wrong_token_is_rejected() {
        let token = token("s3cret-token");
        for presented in [
            "Bearer s3cret-tokeN",
            "Bearer s3cret-token2",
            "Bearer s3cret",
            "Bearer ",
            "Bearer  ",
        ] {
            assert_eq!(
                token.check(Some(&header(presented))),
                Err(Rejection::Mismatch),
                "{presented:?}"
            );
        }
    }

    #[test]
    fn trailing_newlines_are_trimmed() {
        let token = token("abc\r\n\n");
        assert_eq!(token.check(Some(&header("Bearer abc"))), Ok(()));
    }

    #[test]
    fn empty_file_is_rejected() {
        for contents in ["", "\n", "\r\n"] {
            let error = BearerToken::parse(contents.as_bytes(), Path::new("/etc/token")).unwrap_err();
            assert!(matches!(error, TokenFileError::Empty { .. }), "{contents:?}: {error}");
        }
    }

    #[test]
    fn inner_space_is_rejected_without_echo() {
        let error = BearerToken::parse(b"abc def\n", Path::new("/etc/token")).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, TokenFileError::InvalidByte { offset: 3, .. }),
            "{message}"
        );
        assert!(message.contains("--auth-token-file /etc/token"), "{message}");
        assert!(!message.contains("abc"), "{message}");
    }

    #[test]
    fn missing_file_names_flag_and_path() {
        let error = BearerToken::load(Path::new("/nonexistent/token"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("--auth-token-file /nonexistent/token"), "{error}");
        assert!(error.contains("failed to read"), "{error}");
    }

    #[test]
    fn debug_hides_token() {
        let rendered = format!("{:?}", token("s3cret-token"));
        assert!(!rendered.contains("s3cret"), "{rendered}");
    }
}
