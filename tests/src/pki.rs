//! Certificates and a token file for tests of TLS, mTLS and the bearer
//! token, written into one temporary folder.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Token written to the `token` file, followed by a line break.
pub const TOKEN: &str = "test-token-7f3a9c";

/// Files of one test's public key infrastructure:
///
/// - `ca.pem`: the test CA;
/// - `server.pem` and `server-key.pem`: a certificate for `localhost` and
///   `127.0.0.1` signed by the CA, valid for server and client use;
/// - `client.pem` and `client-key.pem`: a client certificate signed by the CA;
/// - `other-ca.pem`, `other-client.pem` and `other-client-key.pem`: a second,
///   unrelated CA and a client certificate it signed;
/// - `token`: [`TOKEN`] and a line break.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates every file listed on [`Pki`].
    pub fn generate() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        let ca = certificate_authority("moge test CA");
        pki.write("ca.pem", &ca.pem());
        let server_key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        pki.write("server.pem", &server.signed_by(&server_key, &ca).unwrap().pem());
        pki.write("server-key.pem", &server_key.serialize_pem());
        let (client, client_key) = client_certificate(&ca, "moge-client");
        pki.write("client.pem", &client);
        pki.write("client-key.pem", &client_key);

        let other_ca = certificate_authority("unrelated CA");
        pki.write("other-ca.pem", &other_ca.pem());
        let (other, other_key) = client_certificate(&other_ca, "intruder");
        pki.write("other-client.pem", &other);
        pki.write("other-client-key.pem", &other_key);
        pki.write("token", &format!("{TOKEN}\n"));
        pki
    }

    /// Writes `contents` into the file `name` of the folder.
    pub fn write(&self, name: &str, contents: &str) {
        std::fs::write(self.path(name), contents).unwrap();
    }

    /// Returns the path of the file `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Returns the path of the file `name` as a command-line argument.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Returns the contents of the file `name`.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap()
    }

    /// Returns the server flags of TLS with the server certificate, plus
    /// mTLS against the test CA when `mtls`.
    pub fn server_args(&self, mtls: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert-file".to_owned(),
            self.arg("server.pem"),
            "--tls-key-file".to_owned(),
            self.arg("server-key.pem"),
        ];
        if mtls {
            args.extend(["--tls-client-ca-file".to_owned(), self.arg("ca.pem")]);
        }
        args
    }
}

/// Creates a self-signed CA named `name`.
fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Issues a client certificate signed by `ca`; returns it and its key as PEM.
fn client_certificate(ca: &CertifiedIssuer<'static, KeyPair>, name: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    (params.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
}
