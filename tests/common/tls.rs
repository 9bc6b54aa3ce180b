//! Test certificates made with rcgen: a throwaway CA and the leaf certificates it signs,
//! written as PEM files; and curl, the real-world TLS and HTTP/2 client the tests drive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};

/// A CA whose certificate (`ca.pem`) clients trust in the tests.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub cert: PathBuf,
    dir: PathBuf,
}

/// A leaf certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCert {
    /// A `{ cert: ..., key: ... }` YAML entry for `tls.certificates`.
    pub fn yaml(&self) -> String {
        format!(
            "{{ cert: \"{}\", key: \"{}\" }}",
            self.cert.display(),
            self.key.display()
        )
    }
}

/// How long a leaf is valid.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Current,
    /// Ended on 2021-01-01.
    Expired,
}

impl TestCa {
    /// A new CA writing its files into `dir`.
    pub fn new(dir: &Path) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "shadowgate test CA");
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let cert = dir.join("ca.pem");
        std::fs::write(&cert, issuer.pem()).expect("write CA");
        TestCa {
            issuer,
            cert,
            dir: dir.to_path_buf(),
        }
    }

    /// A leaf for DNS `names` (the first is also the subject CN), files `{stem}.pem` and `{stem}.key`.
    pub fn issue(&self, stem: &str, names: &[&str], validity: Validity) -> TestCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        if validity == Validity::Expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let leaf = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let cert = self.dir.join(format!("{stem}.pem"));
        let key_path = self.dir.join(format!("{stem}.key"));
        std::fs::write(&cert, leaf.pem()).expect("write leaf");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        TestCert {
            cert,
            key: key_path,
        }
    }
}

/// What one curl run printed.
#[derive(Debug)]
pub struct Curl {
    pub success: bool,
    /// The body, then whatever `-w` wrote.
    pub stdout: String,
    /// With `-v`: the handshake, including the server certificate's subject.
    pub stderr: String,
}

/// Run curl with `args` (never through a proxy; bounded time).
pub async fn curl(args: &[&str]) -> Curl {
    let run = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            "10",
        ])
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("curl finished")
        .expect("curl runs (is it installed?)");
    Curl {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The subject CN of the certificate the server presented, from `curl -v` output.
pub fn presented_cn(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix("subject: "))
        .and_then(|subject| subject.split("CN=").nth(1))
        .map(|cn| cn.split(',').next().unwrap_or(cn).trim().to_string())
}

/// A raw TLS connection to `addr` for `name`, trusting only `ca`, offering HTTP/1.1: for
/// tests that need the bytes and the timing in their own hands.
pub async fn tls_connect(
    ca: &TestCa,
    addr: std::net::SocketAddr,
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca.cert).expect("read CA") {
        roots.add(cert.expect("CA certificate")).expect("trust CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(name.to_string()).expect("server name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}
