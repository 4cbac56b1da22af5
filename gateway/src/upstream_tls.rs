//! TLS of the gateway's connections to the router and the expert services
//! (`--upstream-tls-*`).
//!
//! Upstream servers are verified only against the CA of
//! `--upstream-tls-ca-file`, never against public or system roots, because
//! internal services carry certificates of a private CA. All upstreams use
//! the same scheme: every address is `https://` when the CA is set and
//! `http://` otherwise, so that a typo cannot send hidden states in
//! plaintext.

use std::path::PathBuf;

use moge_shared::tls::{TlsError, load_certificates, load_private_key};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS settings of the gateway's connections to its upstreams.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct UpstreamTlsArgs {
    /// PEM file with the CA certificates that sign the router's and the
    /// expert services' certificates. Turns on TLS to every upstream, whose
    /// addresses must then all be https://.
    #[arg(long, env = "MOGE_UPSTREAM_TLS_CA_FILE", requires = "router")]
    pub upstream_tls_ca_file: Option<PathBuf>,
    /// PEM file with the gateway's client certificate chain, presented to
    /// upstreams that require client certificates (mTLS).
    #[arg(
        long,
        env = "MOGE_UPSTREAM_TLS_CERT_FILE",
        requires_all = ["upstream_tls_key_file", "upstream_tls_ca_file"]
    )]
    pub upstream_tls_cert_file: Option<PathBuf>,
    /// PEM file with the private key of --upstream-tls-cert-file.
    #[arg(long, env = "MOGE_UPSTREAM_TLS_KEY_FILE", requires = "upstream_tls_cert_file")]
    pub upstream_tls_key_file: Option<PathBuf>,
}

/// An upstream address or TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    /// A certificate, key or CA file is unusable.
    #[error(transparent)]
    File(#[from] TlsError),
    /// An `https://` address without a CA to verify it.
    #[error(
        "{upstream}: address {url:?} uses https:// but --upstream-tls-ca-file is not set; set it to the CA file that signs the upstream certificates"
    )]
    HttpsWithoutCa {
        /// Pool name.
        upstream: String,
        /// The address.
        url: String,
    },
    /// A plaintext address while upstream TLS is on.
    #[error(
        "{upstream}: address {url:?} must use https:// because --upstream-tls-ca-file is set; every upstream uses TLS or none does"
    )]
    PlaintextWithCa {
        /// Pool name.
        upstream: String,
        /// The address.
        url: String,
    },
    /// tonic rejected the TLS configuration for an address.
    #[error("{upstream}: failed to configure TLS for {url:?}: {source}")]
    Endpoint {
        /// Pool name.
        upstream: String,
        /// The address.
        url: String,
        /// Underlying error.
        source: tonic::transport::Error,
    },
}

/// The client TLS settings applied to every upstream endpoint.
#[derive(Clone, Debug, Default)]
pub struct UpstreamTls {
    config: Option<ClientTlsConfig>,
}

impl UpstreamTls {
    /// Reads and checks the files named by `args`.
    pub fn load(args: &UpstreamTlsArgs) -> Result<UpstreamTls, UpstreamTlsError> {
        let Some(ca_path) = &args.upstream_tls_ca_file else {
            return Ok(UpstreamTls::default());
        };
        // Parse here, though tonic parses again, so that a bad file is
        // reported at start with the flag's name.
        load_certificates("--upstream-tls-ca-file", ca_path)?;
        let ca = read("--upstream-tls-ca-file", ca_path)?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let (Some(cert_path), Some(key_path)) = (&args.upstream_tls_cert_file, &args.upstream_tls_key_file) {
            let certificates = load_certificates("--upstream-tls-cert-file", cert_path)?;
            let key = load_private_key("--upstream-tls-key-file", key_path)?;
            check_pair(certificates, key, cert_path, key_path)?;
            let identity = Identity::from_pem(
                read("--upstream-tls-cert-file", cert_path)?,
                read("--upstream-tls-key-file", key_path)?,
            );
            config = config.identity(identity);
        }
        Ok(UpstreamTls { config: Some(config) })
    }

    /// Returns whether upstream connections use TLS.
    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// Applies the TLS settings to the endpoint of `url`, after checking
    /// that its scheme matches them; `upstream` names the pool in errors.
    pub fn configure(&self, upstream: &str, url: &str, endpoint: Endpoint) -> Result<Endpoint, UpstreamTlsError> {
        let https = endpoint.uri().scheme_str() == Some("https");
        match (&self.config, https) {
            (None, false) => Ok(endpoint),
            (None, true) => Err(UpstreamTlsError::HttpsWithoutCa {
                upstream: upstream.to_owned(),
                url: url.to_owned(),
            }),
            (Some(_), false) => Err(UpstreamTlsError::PlaintextWithCa {
                upstream: upstream.to_owned(),
                url: url.to_owned(),
            }),
            (Some(config), true) => endpoint
                .tls_config(config.clone())
                .map_err(|source| UpstreamTlsError::Endpoint {
                    upstream: upstream.to_owned(),
                    url: url.to_owned(),
                    source,
                }),
        }
    }
}

fn read(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.display().to_string(),
        source,
    })
}

/// Checks that the client key matches its certificate, which tonic would
/// otherwise report only at the first connection.
fn check_pair(
    certificates: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    key: tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<(), TlsError> {
    let provider = moge_shared::tls::crypto_provider();
    tokio_rustls::rustls::sign::CertifiedKey::from_der(certificates, key, &provider)
        .map(drop)
        .map_err(|error| TlsError::Identity {
            cert_flag: "--upstream-tls-cert-file",
            cert_path: cert_path.display().to_string(),
            key_flag: "--upstream-tls-key-file",
            key_path: key_path.display().to_string(),
            reason: moge_shared::tls::identity_reason(&error),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        Endpoint::from_shared(url.to_owned()).unwrap()
    }

    fn with_ca() -> (tempfile::TempDir, UpstreamTls) {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        let args = UpstreamTlsArgs {
            upstream_tls_ca_file: Some(path),
            ..UpstreamTlsArgs::default()
        };
        (dir, UpstreamTls::load(&args).unwrap())
    }

    #[test]
    fn plaintext_without_ca_is_accepted() {
        let tls = UpstreamTls::default();
        assert!(
            tls.configure("router", "http://127.0.0.1:1", endpoint("http://127.0.0.1:1"))
                .is_ok()
        );
    }

    #[test]
    fn https_without_ca_is_rejected() {
        let tls = UpstreamTls::default();
        let error = tls
            .configure("router", "https://127.0.0.1:1", endpoint("https://127.0.0.1:1"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("--upstream-tls-ca-file is not set"), "{error}");
    }

    #[test]
    fn plaintext_with_ca_is_rejected() {
        let (_dir, tls) = with_ca();
        let error = tls
            .configure("group 3", "http://127.0.0.1:1", endpoint("http://127.0.0.1:1"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("group 3"), "{error}");
        assert!(error.contains("must use https://"), "{error}");
    }

    #[test]
    fn https_with_ca_is_configured() {
        let (_dir, tls) = with_ca();
        assert!(tls.enabled());
        assert!(
            tls.configure("router", "https://localhost:1", endpoint("https://localhost:1"))
                .is_ok()
        );
    }

    #[test]
    fn missing_client_key_file_is_named() {
        let (dir, _) = with_ca();
        let args = UpstreamTlsArgs {
            upstream_tls_ca_file: Some(dir.path().join("ca.pem")),
            upstream_tls_cert_file: Some(dir.path().join("ca.pem")),
            upstream_tls_key_file: Some(dir.path().join("absent-key.pem")),
        };
        let error = UpstreamTls::load(&args).unwrap_err().to_string();
        assert!(error.contains("--upstream-tls-key-file"), "{error}");
        assert!(error.contains("absent-key.pem"), "{error}");
    }
}
