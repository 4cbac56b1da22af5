//! The gateway's security settings in one place: TLS and mTLS on its
//! client-facing ports, TLS to its upstreams and the bearer token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moge_shared::tls::{ALPN_GRPC, ALPN_HTTP1, TlsArgs};
use tokio_rustls::rustls::ServerConfig;

use crate::auth::{BearerToken, RequireToken};
use crate::upstream_tls::{UpstreamTls, UpstreamTlsArgs};

/// Loaded TLS configurations and token, checked at start.
pub struct Security {
    /// TLS of the KServe gRPC port.
    pub grpc_tls: Option<Arc<ServerConfig>>,
    /// TLS of the KServe HTTP port.
    pub http_tls: Option<Arc<ServerConfig>>,
    /// TLS to the router and the expert services.
    pub upstream: UpstreamTls,
    /// Token every protected request must carry.
    pub token: Option<BearerToken>,
}

impl Security {
    /// Reads every certificate, key and token file; the error names the
    /// flag and the file. Logs which settings are on, with file paths only.
    pub fn load(tls: &TlsArgs, upstream: &UpstreamTlsArgs, token_file: Option<&Path>) -> anyhow::Result<Security> {
        let security = Security {
            grpc_tls: tls.server_config(ALPN_GRPC)?,
            http_tls: tls.server_config(ALPN_HTTP1)?,
            upstream: UpstreamTls::load(upstream)?,
            token: token_file.map(BearerToken::load).transpose()?,
        };
        let path = |path: &Option<PathBuf>| path.as_ref().map(|path| path.display().to_string());
        tracing::info!(
            tls = tls.enabled(),
            mtls = tls.client_auth(),
            cert_file = ?path(&tls.tls_cert_file),
            key_file = ?path(&tls.tls_key_file),
            client_ca_file = ?path(&tls.tls_client_ca_file),
            upstream_tls = security.upstream.enabled(),
            upstream_mtls = upstream.upstream_tls_cert_file.is_some(),
            upstream_ca_file = ?path(&upstream.upstream_tls_ca_file),
            upstream_cert_file = ?path(&upstream.upstream_tls_cert_file),
            upstream_key_file = ?path(&upstream.upstream_tls_key_file),
            auth = security.token.is_some(),
            auth_token_file = ?token_file.map(|path| path.display().to_string()),
            "security settings"
        );
        Ok(security)
    }

    /// Builds the routes of the KServe gRPC service, behind the token check
    /// when a token is set.
    pub fn grpc_routes<S>(&self, service: S) -> tonic::service::Routes
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        match &self.token {
            Some(token) => tonic::service::Routes::new(RequireToken::new(service, token.clone())),
            None => tonic::service::Routes::new(service),
        }
    }

    /// Puts the HTTP routes behind the token check when a token is set.
    pub fn http_routes(&self, routes: axum::Router) -> axum::Router {
        match &self.token {
            Some(token) => routes.layer(axum::middleware::from_fn_with_state(
                token.clone(),
                crate::auth::require_token_http,
            )),
            None => routes,
        }
    }
}
