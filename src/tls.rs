//! TLS termination for listeners: the `tls` section, its certificates read and checked once at config
//! load, and the rustls resolver that picks a certificate by SNI (the first one is the default).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use log::warn;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::protocols::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;

use crate::config::{ConfigError, ListenerConfig};

/// A listener's `tls` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The first is the default; the others are chosen by SNI from the names they carry.
    pub certificates: Vec<CertificateFiles>,
    /// Offer HTTP/2 by ALPN (with HTTP/1.1 as the fallback).
    #[serde(default = "default_h2")]
    pub h2: bool,
    /// Filled in at config load: the certificates, parsed and checked.
    #[serde(skip)]
    pub resolver: Option<Arc<SniResolver>>,
}

fn default_h2() -> bool {
    true
}

/// One certificate chain (PEM, leaf first) and its private key (PEM).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsConfig {
    /// Read and check every certificate and key; `at` is the section's field
    /// path (`listeners[0].tls`). Certificates past or before their validity
    /// only warn: refusing to start would turn an expired certificate into an outage.
    pub fn load(&mut self, at: &str) -> Result<(), ConfigError> {
        if self.certificates.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.certificates"),
                "no certificate; add one like `- { cert: /etc/shadowgate/site.pem, key: /etc/shadowgate/site.key }`",
            ));
        }
        let mut loaded = Vec::new();
        for (i, files) in self.certificates.iter().enumerate() {
            let at = format!("{at}.certificates[{i}]");
            let certificate = Certificate::load(files, &at)?;
            certificate.warn_if_outside_validity(&at, unix_now());
            loaded.push(certificate);
        }
        self.resolver = Some(Arc::new(SniResolver::new(loaded)));
        Ok(())
    }

    /// Pingora's TLS settings for this listener; `load` must have succeeded.
    pub fn settings(&self) -> std::io::Result<TlsSettings> {
        let resolver = self.resolver.clone().ok_or_else(|| {
            std::io::Error::other("TLS certificates were not loaded with the configuration")
        })?;
        let mut settings = TlsSettings::intermediate("", "").map_err(std::io::Error::other)?;
        settings.set_cert_resolver(resolver);
        settings.set_alpn(if self.h2 { ALPN::H2H1 } else { ALPN::H1 });
        Ok(settings)
    }
}

impl ListenerConfig {
    /// Load this listener's certificates (if it terminates TLS) and check its
    /// protocol keys; `at` is its field path (`listeners[0]`).
    pub(crate) fn load_tls(&mut self, at: &str) -> Result<(), ConfigError> {
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        if self.h2c {
            return Err(ConfigError::new(
                format!("{at}.h2c"),
                "h2c is cleartext HTTP/2 and this listener terminates TLS; remove h2c (HTTP/2 over TLS is tls.h2)",
            ));
        }
        tls.load(&format!("{at}.tls"))
    }
}

/// A loaded certificate: the key rustls serves, plus what we read from the leaf.
#[derive(Debug)]
struct Certificate {
    key: Arc<CertifiedKey>,
    /// DNS names the leaf is valid for (subjectAltName, else the subject CN), lower case.
    names: Vec<String>,
    not_before: i64,
    not_after: i64,
    path: PathBuf,
}

impl Certificate {
    fn load(files: &CertificateFiles, at: &str) -> Result<Certificate, ConfigError> {
        let cert_at = format!("{at}.cert");
        let key_at = format!("{at}.key");
        let cert_pem = read(&files.cert, &cert_at)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                ConfigError::new(&cert_at, format!("{}: bad PEM: {e}", files.cert.display()))
            })?;
        let Some(leaf) = chain.first() else {
            return Err(ConfigError::new(
                &cert_at,
                format!(
                    "{}: no certificate found; expected PEM `-----BEGIN CERTIFICATE-----` blocks, leaf first",
                    files.cert.display()
                ),
            ));
        };
        let (names, not_before, not_after) = read_leaf(leaf).map_err(|e| {
            ConfigError::new(
                &cert_at,
                format!(
                    "{}: not a valid X.509 certificate: {e}",
                    files.cert.display()
                ),
            )
        })?;

        let key_pem = read(&files.key, &key_at)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            ConfigError::new(
                &key_at,
                format!(
                    "{}: no private key found ({e}); expected a PEM PKCS#8, RSA or EC private key",
                    files.key.display()
                ),
            )
        })?;
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
            ConfigError::new(
                &key_at,
                format!("{}: unusable private key: {e}", files.key.display()),
            )
        })?;
        let key = CertifiedKey::new(chain, signing_key);
        if let Err(e) = key.keys_match() {
            return Err(ConfigError::new(
                &key_at,
                format!(
                    "{} does not match the certificate in {} ({e}); pair each certificate with its own key",
                    files.key.display(),
                    files.cert.display()
                ),
            ));
        }
        Ok(Certificate {
            key: Arc::new(key),
            names,
            not_before,
            not_after,
            path: files.cert.clone(),
        })
    }

    fn warn_if_outside_validity(&self, at: &str, now: i64) {
        if now > self.not_after {
            warn!(
                "{at}.cert: {} expired at {} (Unix time {}); clients will refuse it: renew it, check with -t and reload",
                self.path.display(),
                unix_to_rfc3339(self.not_after),
                self.not_after
            );
        } else if now < self.not_before {
            warn!(
                "{at}.cert: {} is not valid before {}; clients will refuse it until then",
                self.path.display(),
                unix_to_rfc3339(self.not_before)
            );
        }
    }
}

fn read(path: &Path, at: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::new(at, format!("cannot read {}: {e}", path.display())))
}

/// The leaf's DNS names and validity window (Unix seconds).
fn read_leaf(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("bad subjectAltName: {e}")),
    };
    if names.is_empty() {
        names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_ascii_lowercase)
            .collect();
    }
    let validity = cert.validity();
    Ok((
        names,
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// Picks the certificate for a TLS handshake by SNI: an exact name first, then
/// a `*.suffix` wildcard, else the default (the first certificate). Among
/// certificates claiming the same name, the first listed wins.
#[derive(Debug)]
pub struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`, e.g. `example.com` for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    /// `certificates` must not be empty (checked at load).
    fn new(certificates: Vec<Certificate>) -> SniResolver {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for certificate in &certificates {
            for name in &certificate.names {
                let table = match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()),
                    None => exact.entry(name.clone()),
                };
                table.or_insert_with(|| certificate.key.clone());
            }
        }
        SniResolver {
            default: certificates[0].key.clone(),
            exact,
            wildcard,
        }
    }

    /// The certificate for a client that asked for `server_name` (None: no SNI).
    fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name.map(str::to_ascii_lowercase) else {
            return &self.default;
        };
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(client_hello.server_name()).clone())
    }
}

/// The negotiated TLS version as in logs elsewhere (`TLSv1.3`), from rustls' `TLSv1_3`.
pub fn version_label(rustls_name: &str) -> &'static str {
    match rustls_name {
        "TLSv1_3" => "TLSv1.3",
        "TLSv1_2" => "TLSv1.2",
        "" => "",
        _ => "other",
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `2026-11-27T19:30:00Z` for Unix seconds (proleptic Gregorian, UTC).
pub fn unix_to_rfc3339(secs: i64) -> String {
    let (date, time) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(date);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leaf for `names` (the first is the CN), loaded as shadowgate loads it.
    fn certificate(names: &[&str]) -> Certificate {
        let dir = tempfile::tempdir().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = CertificateFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("c.key"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        Certificate::load(&files, "t").unwrap()
    }

    #[test]
    fn sni_prefers_exact_names_then_wildcards_then_the_default() {
        let first = certificate(&["a.test"]);
        let wild = certificate(&["*.b.test", "x.test"]);
        let exact = certificate(&["one.b.test", "a.test"]);
        let keys: Vec<Arc<CertifiedKey>> = [&first, &wild, &exact]
            .iter()
            .map(|c| c.key.clone())
            .collect();
        let resolver = SniResolver::new(vec![first, wild, exact]);
        let picked = |name: Option<&str>| {
            let key = resolver.pick(name);
            keys.iter().position(|k| Arc::ptr_eq(k, key)).unwrap()
        };
        assert_eq!(
            picked(Some("a.test")),
            0,
            "the first listed wins a shared name"
        );
        assert_eq!(picked(Some("two.b.test")), 1);
        assert_eq!(picked(Some("TWO.B.test")), 1, "names are case-insensitive");
        assert_eq!(picked(Some("one.b.test")), 2, "exact beats wildcard");
        assert_eq!(
            picked(Some("b.test")),
            0,
            "a wildcard does not cover its parent"
        );
        assert_eq!(picked(Some("deep.two.b.test")), 0, "nor two levels down");
        assert_eq!(picked(Some("x.test")), 1);
        assert_eq!(picked(Some("unknown.test")), 0);
        assert_eq!(picked(None), 0);
    }

    #[test]
    fn dates_format_as_rfc3339() {
        assert_eq!(unix_to_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(unix_to_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(unix_to_rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn tls_versions_read_like_openssl_names() {
        assert_eq!(version_label("TLSv1_3"), "TLSv1.3");
        assert_eq!(version_label("TLSv1_2"), "TLSv1.2");
    }
}
