//! TLS for the services' listening ports, with optional client-certificate
//! verification (mTLS), on rustls with the `ring` crypto provider.
//!
//! Certificates and keys are read from PEM files named by flags. Errors name
//! the flag and the file; key material never reaches a log or an error.
//! Handshakes run in their own tasks, so a slow or silent client cannot hold
//! up the accept loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;

/// ALPN protocol of gRPC, which runs on HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN protocol of the HTTP/JSON port, which serves HTTP/1.1.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// Time a client gets to finish the TLS handshake before its connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings of a service's listening ports; flatten into a binary's
/// arguments with `#[command(flatten)]`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM file with the server certificate chain, leaf first. With
    /// --tls-key-file it turns on TLS for the gRPC port (and for the
    /// gateway's HTTP port too).
    #[arg(long, env = "MOGE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert-file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "MOGE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM file with the CA certificates that sign client certificates.
    /// When set, every client must present a certificate signed by one of
    /// them (mTLS); needs --tls-cert-file and --tls-key-file.
    #[arg(long, env = "MOGE_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
}

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{flag} {path}: failed to read the file: {source}")]
    Read {
        /// Flag that named the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{flag} {path}: invalid PEM: {source}")]
    Pem {
        /// Flag that named the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// Underlying error.
        source: pem::Error,
    },
    /// The file contains no `CERTIFICATE` section.
    #[error("{flag} {path}: no certificate found, expected at least one PEM \"CERTIFICATE\" section")]
    NoCertificate {
        /// Flag that named the file.
        flag: &'static str,
        /// The file.
        path: String,
    },
    /// The file contains no private key section.
    #[error(
        "{flag} {path}: no private key found, expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" section"
    )]
    NoPrivateKey {
        /// Flag that named the file.
        flag: &'static str,
        /// The file.
        path: String,
    },
    /// A CA certificate could not be added to the trust store.
    #[error("{flag} {path}: invalid CA certificate: {source}")]
    InvalidCa {
        /// Flag that named the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// Underlying error.
        source: rustls::Error,
    },
    /// The certificate and the key do not belong together, or rustls
    /// rejects the pair (for example an unsupported key type).
    #[error("{cert_flag} {cert_path} and {key_flag} {key_path}: {reason}")]
    Identity {
        /// Flag that named the certificate file.
        cert_flag: &'static str,
        /// The certificate file.
        cert_path: String,
        /// Flag that named the key file.
        key_flag: &'static str,
        /// The key file.
        key_path: String,
        /// Reason the pair is unusable.
        reason: String,
    },
    /// The client verifier could not be built from the CA certificates.
    #[error("{flag} {path}: failed to build the client certificate verifier: {reason}")]
    ClientVerifier {
        /// Flag that named the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// Reason the verifier could not be built.
        reason: String,
    },
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.display().to_string(),
        source,
    })
}

/// Reads every certificate of a PEM file; `flag` names the file in errors.
pub fn load_certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(flag, path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            flag,
            path: path.display().to_string(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.display().to_string(),
        });
    }
    Ok(certificates)
}

/// Reads the first private key of a PEM file; `flag` names the file in errors.
pub fn load_private_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            flag,
            path: path.display().to_string(),
        },
        source => TlsError::Pem {
            flag,
            path: path.display().to_string(),
            source,
        },
    })
}

/// Reads the CA certificates of a PEM file into a trust store.
pub fn load_roots(flag: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(flag, path)? {
        roots.add(certificate).map_err(|source| TlsError::InvalidCa {
            flag,
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(roots)
}

/// Returns the crypto provider of every TLS configuration here. It is
/// passed explicitly, so no process-wide default has to be installed.
///
/// NOTE: rustls 0.23.48 deprecates the *ring* provider because it has no
/// post-quantum key exchange. It matches tonic's `tls-ring` feature and
/// needs no C toolchain. tonic's `tls-aws-lc` feature with
/// `rustls::crypto::aws_lc_rs::default_provider()` would add X25519MLKEM768.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsArgs {
    /// Returns whether the flags turn TLS on.
    pub fn enabled(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    /// Returns whether the flags require client certificates.
    pub fn client_auth(&self) -> bool {
        self.tls_client_ca_file.is_some()
    }

    /// Builds the server configuration offering the ALPN protocols `alpn`,
    /// or `None` when TLS is off. Reads and checks every file, so that a bad
    /// file stops the service at start.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        let (Some(cert_path), Some(key_path)) = (&self.tls_cert_file, &self.tls_key_file) else {
            return Ok(None);
        };
        let certificates = load_certificates("--tls-cert-file", cert_path)?;
        let key = load_private_key("--tls-key-file", key_path)?;
        let provider = crypto_provider();
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Identity {
                cert_flag: "--tls-cert-file",
                cert_path: cert_path.display().to_string(),
                key_flag: "--tls-key-file",
                key_path: key_path.display().to_string(),
                reason: error.to_string(),
            })?;
        let builder = match &self.tls_client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca_path) => {
                let flag = "--tls-client-ca-file";
                let roots = load_roots(flag, ca_path)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|error| TlsError::ClientVerifier {
                        flag,
                        path: ca_path.display().to_string(),
                        reason: error.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certificates, key)
            .map_err(|error| TlsError::Identity {
                cert_flag: "--tls-cert-file",
                cert_path: cert_path.display().to_string(),
                key_flag: "--tls-key-file",
                key_path: key_path.display().to_string(),
                reason: identity_reason(&error),
            })?;
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(Some(Arc::new(config)))
    }

    /// Logs whether TLS and mTLS are on and which files they use; never
    /// logs file contents.
    pub fn log_summary(&self, service: &str) {
        let path = |path: &Option<PathBuf>| path.as_ref().map(|path| path.display().to_string());
        tracing::info!(
            service,
            tls = self.enabled(),
            mtls = self.client_auth(),
            cert_file = ?path(&self.tls_cert_file),
            key_file = ?path(&self.tls_key_file),
            client_ca_file = ?path(&self.tls_client_ca_file),
            "TLS settings"
        );
    }
}

/// Turns rustls' error for a certificate and key pair into an operator's sentence.
pub fn identity_reason(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key does not match the certificate's public key".to_owned()
        }
        other => format!("unusable certificate and key: {other}"),
    }
}

/// TLS connections accepted on a TCP listener, handshaken in the background.
///
/// It is a stream for tonic's `serve_with_incoming*`. The accept task stops
/// and closes the listener once this value is dropped.
pub struct TlsIncoming {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsIncoming {
    /// Accepts connections on `listener` and runs the TLS handshake of each
    /// in its own task with `config`. A handshake that fails or takes longer
    /// than [`HANDSHAKE_TIMEOUT`] closes that connection only.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsIncoming> {
        let local_addr = listener.local_addr()?;
        let (sender, connections) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), sender));
        Ok(TlsIncoming {
            connections,
            local_addr,
        })
    }

    /// Waits for the next connection whose handshake succeeded, with the
    /// client's address; `None` only if the accept task has stopped.
    pub async fn accept(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.connections.recv().await
    }

    /// Address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.connections
            .poll_recv(context)
            .map(|connection| connection.map(|(stream, _)| Ok(stream)))
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    sender: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = sender.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(connection) => connection,
            Err(error) => {
                // Running out of file descriptors is the usual cause; a
                // short pause lets connections close before the next try.
                tracing::warn!(%error, "failed to accept a connection; will retry");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Without TCP_NODELAY, small responses wait for the peer's delayed acknowledgement.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, %peer, "failed to set TCP_NODELAY on a connection");
        }
        let acceptor = acceptor.clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = sender.send((stream, peer)).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed; connection closed");
                }
                Err(_) => {
                    tracing::debug!(%peer, timeout_seconds = HANDSHAKE_TIMEOUT.as_secs(), "TLS handshake timed out; connection closed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    /// Generates a self-signed certificate for `localhost` and its key, as PEM.
    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (certificate.pem(), key.serialize_pem())
    }

    fn args(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> TlsArgs {
        TlsArgs {
            tls_cert_file: Some(cert),
            tls_key_file: Some(key),
            tls_client_ca_file: client_ca,
        }
    }

    #[test]
    fn matching_pair_builds_config() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let args = args(files.write("cert.pem", &cert), files.write("key.pem", &key), None);

        let config = args.server_config(ALPN_GRPC).unwrap().unwrap();

        assert_eq!(config.alpn_protocols, [b"h2".to_vec()]);
    }

    #[test]
    fn tls_off_without_files() {
        assert!(TlsArgs::default().server_config(ALPN_GRPC).unwrap().is_none());
    }

    #[test]
    fn missing_file_names_flag_and_path() {
        let files = Files::new();
        let (_, key) = self_signed();
        let missing = files.dir.path().join("absent.pem");
        let args = args(missing.clone(), files.write("key.pem", &key), None);

        let error = args.server_config(ALPN_GRPC).unwrap_err().to_string();

        assert!(error.contains("--tls-cert-file"), "{error}");
        assert!(error.contains(&missing.display().to_string()), "{error}");
        assert!(error.contains("failed to read"), "{error}");
    }

    #[test]
    fn file_without_certificate_is_rejected() {
        let files = Files::new();
        let (_, key) = self_signed();
        // A key where the certificate belongs is a common mix-up.
        let args = args(files.write("cert.pem", &key), files.write("key.pem", &key), None);

        let error = args.server_config(ALPN_GRPC).unwrap_err();

        assert!(
            matches!(
                error,
                TlsError::NoCertificate {
                    flag: "--tls-cert-file",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn file_without_key_is_rejected() {
        let files = Files::new();
        let (cert, _) = self_signed();
        let args = args(files.write("cert.pem", &cert), files.write("key.pem", &cert), None);

        let error = args.server_config(ALPN_GRPC).unwrap_err();

        assert!(
            matches!(
                error,
                TlsError::NoPrivateKey {
                    flag: "--tls-key-file",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("no private key found"), "{error}");
    }

    #[test]
    fn key_of_other_certificate_is_rejected() {
        let files = Files::new();
        let (cert, _) = self_signed();
        let (_, other_key) = self_signed();
        let args = args(files.write("cert.pem", &cert), files.write("key.pem", &other_key), None);

        let error = args.server_config(ALPN_GRPC).unwrap_err().to_string();

        assert!(error.contains("does not match"), "{error}");
        assert!(error.contains("--tls-key-file"), "{error}");
    }

    #[test]
    fn broken_pem_is_rejected() {
        let files = Files::new();
        let (_, key) = self_signed();
        let broken = "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n";
        let args = args(files.write("cert.pem", broken), files.write("key.pem", &key), None);

        let error = args.server_config(ALPN_GRPC).unwrap_err();

        assert!(
            matches!(
                error,
                TlsError::Pem {
                    flag: "--tls-cert-file",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn client_ca_without_certificate_is_rejected() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let args = args(
            files.write("cert.pem", &cert),
            files.write("key.pem", &key),
            Some(files.write("ca.pem", "")),
        );

        let error = args.server_config(ALPN_GRPC).unwrap_err();

        assert!(
            matches!(
                error,
                TlsError::NoCertificate {
                    flag: "--tls-client-ca-file",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn key_contents_never_in_errors() {
        let files = Files::new();
        let (cert, _) = self_signed();
        let (_, other_key) = self_signed();
        let args = args(files.write("cert.pem", &cert), files.write("key.pem", &other_key), None);

        let error = args.server_config(ALPN_GRPC).unwrap_err();
        let rendered = format!("{error} {error:?}");

        let body = other_key.lines().nth(1).unwrap();
        assert!(!rendered.contains(body), "{rendered}");
    }
}
