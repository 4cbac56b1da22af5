//! Connection settings of a client of the gateway's KServe ports: the bearer
//! token (`--auth-token-file`), client TLS (`--tls-ca-file`,
//! `--tls-cert-file`, `--tls-key-file`) and the rules that tie them to the
//! scheme of a gateway address.
//!
//! The gateway's certificate is verified only against `--tls-ca-file`,
//! never against public or system roots, as the gateway does for its own
//! upstreams. Neither the token nor key material reaches a log, an error
//! message or `Debug` output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use moge_shared::tls::{TlsError, crypto_provider, identity_reason, load_certificates, load_private_key, load_roots};
use moge_telemetry::balance::BalanceReport;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::sign::CertifiedKey;
use ureq::tls::{ClientCert, RootCerts, TlsConfig, TlsProvider};

const CA_FLAG: &str = "--tls-ca-file";
const CERT_FLAG: &str = "--tls-cert-file";
const KEY_FLAG: &str = "--tls-key-file";

/// Credentials for the gateway, flattened into a tool's arguments with
/// `#[command(flatten)]`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientArgs {
    /// File with the gateway's bearer token (the file the gateway reads with
    /// its --auth-token-file). Surrounding whitespace is trimmed, and the
    /// token is sent as `authorization: Bearer TOKEN`.
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM file with the CA certificates that sign the gateway's
    /// certificate. Turns on TLS: a HOST:PORT address becomes https://.
    /// Required for an https:// address, because system roots are not used.
    #[arg(long, value_name = "FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file with the client certificate chain, for a gateway that
    /// requires client certificates (mTLS). Needs --tls-key-file and
    /// --tls-ca-file.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key_file", "tls_ca_file"])]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert-file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
}

/// A token file, TLS file or address that cannot be used. The messages
/// never contain the token or key material.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The token file could not be read.
    #[error("--auth-token-file {path}: failed to read the file: {source}")]
    TokenRead {
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The token file is empty or contains only whitespace.
    #[error("--auth-token-file {path}: the file is empty, expected the gateway's bearer token")]
    TokenEmpty {
        /// The file.
        path: String,
    },
    /// The token contains a byte that the gateway never accepts in a token.
    #[error(
        "--auth-token-file {path}: byte {offset} of the token is not visible ASCII; \
         expected printable characters without spaces, as the gateway requires"
    )]
    TokenInvalidByte {
        /// The file.
        path: String,
        /// Offset of the first bad byte in the trimmed token.
        offset: usize,
    },
    /// A certificate, key or CA file is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// An `https://` address without a CA to verify the gateway.
    #[error(
        "{flag} {address:?} uses https:// but --tls-ca-file is not set; set it to the PEM file \
         of the CA that signs the gateway's certificate (system roots are not used)"
    )]
    HttpsWithoutCa {
        /// Flag that named the address.
        flag: &'static str,
        /// The address.
        address: String,
    },
    /// An `http://` address while TLS is on.
    #[error(
        "{flag} {address:?} uses http:// but --tls-ca-file is set; \
         use https://HOST:PORT or HOST:PORT, or drop the TLS flags"
    )]
    PlaintextWithTls {
        /// Flag that named the address.
        flag: &'static str,
        /// The address.
        address: String,
    },
}

/// Checks the form of a gateway address: `HOST:PORT`, `http://…` or
/// `https://…`, and returns it unchanged, because [`ClientSecurity::url`]
/// adds the scheme later. Meant for clap's `value_parser`, which names the flag.
pub fn parse_address(text: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected HOST:PORT, http://HOST:PORT or https://HOST:PORT";
    match text.split_once("://") {
        Some(("http" | "https", "")) => Err(format!("the host is missing, {EXPECTED}")),
        Some(("http" | "https", _)) => Ok(text.to_owned()),
        Some((scheme, _)) => Err(format!("scheme {scheme}:// is not supported, {EXPECTED}")),
        None => {
            let (host, port) = text
                .trim_end_matches('/')
                .rsplit_once(':')
                .ok_or_else(|| format!("the port is missing, {EXPECTED}"))?;
            if host.is_empty() {
                return Err(format!("the host is missing, {EXPECTED}"));
            }
            if port.parse::<u16>().is_err() {
                return Err(format!("port {port:?} is not a number from 0 to 65535, {EXPECTED}"));
            }
            Ok(text.to_owned())
        }
    }
}

/// The value of the `authorization` header or metadata, `Bearer TOKEN`.
/// Its `Debug` output hides the token.
#[derive(Clone)]
pub struct Authorization(String);

impl Authorization {
    /// Reads the token from `path`, trimmed of surrounding whitespace.
    pub fn load(path: &Path) -> Result<Authorization, ClientError> {
        let contents = std::fs::read(path).map_err(|source| ClientError::TokenRead {
            path: path.display().to_string(),
            source,
        })?;
        let token = contents.trim_ascii();
        if token.is_empty() {
            return Err(ClientError::TokenEmpty {
                path: path.display().to_string(),
            });
        }
        if let Some(offset) = token.iter().position(|byte| !byte.is_ascii_graphic()) {
            return Err(ClientError::TokenInvalidByte {
                path: path.display().to_string(),
                offset,
            });
        }
        // Every byte is visible ASCII, so the lossy conversion changes nothing.
        Ok(Authorization(format!("Bearer {}", String::from_utf8_lossy(token))))
    }

    /// Returns the header value, `Bearer TOKEN`.
    pub fn value(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Authorization {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Authorization(<redacted>)")
    }
}

/// The client certificate and its key.
struct ClientIdentity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// The chain and key in ureq's types.
    ureq_cert: ClientCert,
}

/// Client TLS settings read from the files of [`ClientArgs`].
pub struct ClientTls {
    ca_pem: Vec<u8>,
    roots: Vec<CertificateDer<'static>>,
    identity: Option<ClientIdentity>,
}

impl ClientTls {
    /// Returns the PEM contents of `--tls-ca-file`.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// Returns the PEM contents of `--tls-cert-file` and `--tls-key-file`,
    /// when a client certificate is set.
    pub fn identity_pem(&self) -> Option<(&[u8], &[u8])> {
        self.identity
            .as_ref()
            .map(|identity| (identity.cert_pem.as_slice(), identity.key_pem.as_slice()))
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClientTls")
            .field("roots", &self.roots.len())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// The token and TLS settings of one tool run, read and checked once.
#[derive(Debug, Default)]
pub struct ClientSecurity {
    authorization: Option<Authorization>,
    tls: Option<ClientTls>,
}

impl ClientSecurity {
    /// Reads and checks every file named by `args`, so that a bad file
    /// stops the tool before it connects.
    pub fn load(args: &ClientArgs) -> Result<ClientSecurity, ClientError> {
        let authorization = args.auth_token_file.as_deref().map(Authorization::load).transpose()?;
        let tls = match &args.tls_ca_file {
            Some(ca_path) => Some(load_tls(ca_path, args)?),
            None => None,
        };
        Ok(ClientSecurity { authorization, tls })
    }

    /// Returns the `authorization` value to send, when a token is set.
    pub fn authorization(&self) -> Option<&Authorization> {
        self.authorization.as_ref()
    }

    /// Returns the TLS settings, when TLS is on.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// Returns the URL of `address` (checked by [`parse_address`]): a
    /// HOST:PORT gets `https://` when TLS is on and `http://` otherwise. An
    /// explicit scheme must match the TLS settings. `flag` names the
    /// address in errors.
    pub fn url(&self, flag: &'static str, address: &str) -> Result<String, ClientError> {
        let tls = self.tls.is_some();
        if address.starts_with("https://") {
            if !tls {
                return Err(ClientError::HttpsWithoutCa {
                    flag,
                    address: address.to_owned(),
                });
            }
            Ok(address.to_owned())
        } else if address.starts_with("http://") {
            if tls {
                return Err(ClientError::PlaintextWithTls {
                    flag,
                    address: address.to_owned(),
                });
            }
            Ok(address.to_owned())
        } else {
            let scheme = if tls { "https" } else { "http" };
            Ok(format!("{scheme}://{address}"))
        }
    }

    /// Builds an HTTP agent with these TLS settings and `timeout` for each
    /// request. 4xx and 5xx responses are returned, not turned into errors.
    pub fn http_agent(&self, timeout: Duration) -> ureq::Agent {
        // Without --tls-ca-file the root list is empty, so an https:// URL
        // fails verification instead of trusting any built-in roots. The
        // agent never gets one, because `url` rejects it first.
        let roots: Vec<ureq::tls::Certificate<'static>> = self
            .tls
            .iter()
            .flat_map(|tls| &tls.roots)
            .map(|root| ureq::tls::Certificate::from_der(root.as_ref()).to_owned())
            .collect();
        let client_cert = self
            .tls
            .as_ref()
            .and_then(|tls| tls.identity.as_ref())
            .map(|identity| identity.ureq_cert.clone());
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(crypto_provider())
            .root_certs(RootCerts::new_with_certs(&roots))
            .client_cert(client_cert)
            .build();
        ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .tls_config(tls)
            .build()
            .into()
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.display().to_string(),
        source,
    })
}

fn load_tls(ca_path: &Path, args: &ClientArgs) -> Result<ClientTls, ClientError> {
    // load_roots checks that every certificate is a usable trust anchor.
    load_roots(CA_FLAG, ca_path)?;
    let roots = load_certificates(CA_FLAG, ca_path)?;
    let ca_pem = read(CA_FLAG, ca_path)?;
    let identity = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert_path), Some(key_path)) => Some(load_identity(cert_path, key_path)?),
        _ => None,
    };
    Ok(ClientTls {
        ca_pem,
        roots,
        identity,
    })
}

/// Reads the client certificate and key and checks that they belong
/// together, which the TLS libraries would otherwise report only at the
/// first connection (ureq by panicking).
fn load_identity(cert_path: &Path, key_path: &Path) -> Result<ClientIdentity, ClientError> {
    let chain = load_certificates(CERT_FLAG, cert_path)?;
    let key = load_private_key(KEY_FLAG, key_path)?;
    CertifiedKey::from_der(chain.clone(), key, &crypto_provider()).map_err(|error| TlsError::Identity {
        cert_flag: CERT_FLAG,
        cert_path: cert_path.display().to_string(),
        key_flag: KEY_FLAG,
        key_path: key_path.display().to_string(),
        reason: identity_reason(&error),
    })?;
    let key_pem = read(KEY_FLAG, key_path)?;
    // ureq 3.5 does not export the key kind that its DER constructor takes,
    // so the key comes from ureq's PEM reader. load_private_key has read the
    // same file, so this fails only if the two readers disagree.
    let ureq_key = ureq::tls::PrivateKey::from_pem(&key_pem).map_err(|error| TlsError::Identity {
        cert_flag: CERT_FLAG,
        cert_path: cert_path.display().to_string(),
        key_flag: KEY_FLAG,
        key_path: key_path.display().to_string(),
        reason: format!("the HTTP client cannot read the key: {error}"),
    })?;
    let ureq_chain: Vec<ureq::tls::Certificate<'static>> = chain
        .iter()
        .map(|certificate| ureq::tls::Certificate::from_der(certificate.as_ref()).to_owned())
        .collect();
    Ok(ClientIdentity {
        cert_pem: read(CERT_FLAG, cert_path)?,
        key_pem,
        ureq_cert: ClientCert::new_with_certs(&ureq_chain, ureq_key),
    })
}

/// Reads the balance report from a gateway's HTTP port.
pub struct BalanceClient {
    agent: ureq::Agent,
    url: String,
    flag: &'static str,
    authorization: Option<Authorization>,
}

impl BalanceClient {
    /// Prepares requests to `GET /v1/balance` of the gateway at `address`,
    /// named by `flag` in errors, each bounded by `timeout`.
    pub fn new(
        security: &ClientSecurity,
        flag: &'static str,
        address: &str,
        timeout: Duration,
    ) -> Result<BalanceClient, ClientError> {
        let base = security.url(flag, address)?;
        Ok(BalanceClient {
            agent: security.http_agent(timeout),
            url: format!("{}/v1/balance", base.trim_end_matches('/')),
            flag,
            authorization: security.authorization().cloned(),
        })
    }

    /// Returns the URL it requests.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fetches the report once.
    pub fn fetch(&self) -> anyhow::Result<BalanceReport> {
        let mut request = self.agent.get(&self.url);
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization.value());
        }
        let mut response = request.call().with_context(|| {
            format!(
                "failed to fetch {}; is the gateway's HTTP address right ({})?",
                self.url, self.flag
            )
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|value| value["error"].as_str().map(str::to_owned))
                .unwrap_or(body);
            let hint = match (status.as_u16(), &self.authorization) {
                (401, None) => "; set --auth-token-file to the gateway's token file",
                (401, Some(_)) => "; check that --auth-token-file contains the gateway's token",
                _ => "",
            };
            anyhow::bail!("{} returned {status}: {}{hint}", self.url, message.trim());
        }
        response
            .body_mut()
            .read_json::<BalanceReport>()
            .with_context(|| format!("{} did not return a balance report", self.url))
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

    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn security(args: &ClientArgs) -> ClientSecurity {
        ClientSecurity::load(args).unwrap()
    }

    #[test]
    fn address_forms() {
        for accepted in [
            "127.0.0.1:8000",
            "[::1]:8001",
            "localhost:80/",
            "http://h:1",
            "https://h",
        ] {
            assert_eq!(parse_address(accepted).as_deref(), Ok(accepted), "{accepted}");
        }
        for (rejected, reason) in [
            ("ftp://h:1", "scheme ftp://"),
            ("grpc://h:1", "scheme grpc://"),
            ("127.0.0.1", "port is missing"),
            (":8000", "host is missing"),
            ("http://", "host is missing"),
            ("h:99999", "port \"99999\""),
        ] {
            let error = parse_address(rejected).unwrap_err();
            assert!(error.contains(reason), "{rejected}: {error}");
            assert!(error.contains("HOST:PORT"), "{rejected}: {error}");
        }
    }

    #[test]
    fn scheme_follows_tls_settings() {
        let plain = ClientSecurity::default();
        assert_eq!(
            plain.url("--gateway", "127.0.0.1:8000").unwrap(),
            "http://127.0.0.1:8000"
        );
        assert_eq!(plain.url("--gateway", "http://h:1").unwrap(), "http://h:1");
        let error = plain.url("--gateway", "https://h:1").unwrap_err().to_string();
        assert!(error.contains("--gateway \"https://h:1\""), "{error}");
        assert!(error.contains("--tls-ca-file is not set"), "{error}");

        let files = Files::new();
        let (cert, _) = self_signed();
        let tls = security(&ClientArgs {
            tls_ca_file: Some(files.write("ca.pem", &cert)),
            ..ClientArgs::default()
        });
        assert_eq!(tls.url("--target", "127.0.0.1:8001").unwrap(), "https://127.0.0.1:8001");
        assert_eq!(tls.url("--target", "https://h:1").unwrap(), "https://h:1");
        let error = tls.url("--target", "http://h:1").unwrap_err().to_string();
        assert!(error.contains("--target \"http://h:1\" uses http://"), "{error}");
    }

    #[test]
    fn token_is_trimmed_and_hidden() {
        let files = Files::new();
        let path = files.write("token", "  \tsecret-42\r\n\n");

        let authorization = Authorization::load(&path).unwrap();

        assert_eq!(authorization.value(), "Bearer secret-42");
        assert!(!format!("{authorization:?}").contains("secret"));
        let security = security(&ClientArgs {
            auth_token_file: Some(path),
            ..ClientArgs::default()
        });
        assert!(!format!("{security:?}").contains("secret"));
    }

    #[test]
    fn empty_token_file_names_flag() {
        let files = Files::new();
        for contents in ["", " \n\r\n\t"] {
            let path = files.write("token", contents);
            let error = Authorization::load(&path).unwrap_err().to_string();
            assert!(error.starts_with("--auth-token-file "), "{error}");
            assert!(error.contains("the file is empty"), "{error}");
        }
    }

    #[test]
    fn token_with_space_is_rejected_unprinted() {
        let files = Files::new();
        let path = files.write("token", "two words\n");

        let error = Authorization::load(&path).unwrap_err().to_string();

        assert!(error.contains("byte 3"), "{error}");
        assert!(!error.contains("words"), "{error}");
    }

    #[test]
    fn missing_token_file_names_flag() {
        let files = Files::new();
        let path = files.dir.path().join("absent");
        let error = Authorization::load(&path).unwrap_err().to_string();
        assert!(error.contains("--auth-token-file"), "{error}");
        assert!(error.contains("failed to read"), "{error}");
    }

    #[test]
    fn ca_file_without_certificate_names_flag() {
        let files = Files::new();
        let (_, key) = self_signed();
        let args = ClientArgs {
            tls_ca_file: Some(files.write("ca.pem", &key)),
            ..ClientArgs::default()
        };
        let error = ClientSecurity::load(&args).unwrap_err().to_string();
        assert!(error.contains("--tls-ca-file"), "{error}");
        assert!(error.contains("no certificate found"), "{error}");
    }

    #[test]
    fn mismatched_client_key_is_rejected() {
        let files = Files::new();
        let (cert, _) = self_signed();
        let (_, other_key) = self_signed();
        let args = ClientArgs {
            tls_ca_file: Some(files.write("ca.pem", &cert)),
            tls_cert_file: Some(files.write("client.pem", &cert)),
            tls_key_file: Some(files.write("client-key.pem", &other_key)),
            ..ClientArgs::default()
        };

        let error = ClientSecurity::load(&args).unwrap_err().to_string();

        assert!(error.contains("--tls-cert-file"), "{error}");
        assert!(error.contains("--tls-key-file"), "{error}");
        assert!(error.contains("does not match"), "{error}");
        let key_line = other_key.lines().nth(1).unwrap();
        assert!(!error.contains(key_line), "{error}");
    }

    #[test]
    fn matching_client_identity_loads() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let args = ClientArgs {
            tls_ca_file: Some(files.write("ca.pem", &cert)),
            tls_cert_file: Some(files.write("client.pem", &cert)),
            tls_key_file: Some(files.write("client-key.pem", &key)),
            ..ClientArgs::default()
        };

        let security = security(&args);

        let tls = security.tls().unwrap();
        assert_eq!(tls.ca_pem(), cert.as_bytes());
        assert_eq!(tls.identity_pem(), Some((cert.as_bytes(), key.as_bytes())));
        // Building the agent must not panic on the converted key.
        let _agent = security.http_agent(Duration::from_secs(1));
        assert!(!format!("{security:?}").contains(key.lines().nth(1).unwrap()));
    }
}
