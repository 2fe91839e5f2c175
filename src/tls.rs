//! Serving TLS: the PEM files named by `tls:` become a rustls certificate resolver that every
//! listener shares. A watcher thread re-reads both files every `reload_interval` and swaps in a
//! changed pair, so a certificate rotated on disk (certbot rewriting files, cert-manager
//! swapping a symlink) reaches new connections without a restart. A pair that does not load is
//! logged and the one in use stays.
//!
//! This module needs only rustls (ring), not pingora, because `preflight` loads the pair after
//! parsing the config too: `check-config` then fails on the same mistakes `serve` would.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rustls::crypto::ring;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use crate::config::TlsConfig;

/// A pair that cannot be used: which `tls:` field, its file, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tls.{field}: {path:?}: {problem}")]
pub struct TlsError {
    /// `cert_file` or `key_file`.
    pub field: &'static str,
    pub path: PathBuf,
    pub problem: String,
}

/// Reads and checks a certificate chain and its private key: both PEM, the key usable by ring
/// and matching the first certificate.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let (cert_pem, key_pem) = (read(CERT, cert_file)?, read(KEY, key_file)?);
    parse(&cert_pem, cert_file, &key_pem, key_file)
}

const CERT: &str = "cert_file";
const KEY: &str = "key_file";

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| problem(field, path, format!("cannot be read: {e}")))
}

fn problem(field: &'static str, path: &Path, problem: String) -> TlsError {
    TlsError {
        field,
        path: path.to_path_buf(),
        problem,
    }
}

fn parse(
    cert_pem: &[u8],
    cert_file: &Path,
    key_pem: &[u8],
    key_file: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(CERT, cert_file, format!("is not valid PEM: {e}")))?;
    if chain.is_empty() {
        let msg = "contains no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string();
        return Err(problem(CERT, cert_file, msg));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => problem(
            KEY,
            key_file,
            "contains no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
        ),
        e => problem(KEY, key_file, format!("is not valid PEM: {e}")),
    })?;
    let signer = ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| problem(KEY, key_file, format!("is not a usable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            let msg = format!("does not match the certificate in {cert_file:?}");
            Err(problem(KEY, key_file, msg))
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(e) => Err(problem(
            CERT,
            cert_file,
            format!("its first certificate cannot be parsed: {e}"),
        )),
    }
}

/// What the log and the metrics tell about the certificate served (only the server needs it,
/// so the fuzz build, without the `server` feature, skips x509-parser).
#[cfg(feature = "server")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The first certificate's subject, e.g. `CN=mirror.example`.
    pub subject: String,
    /// Its notAfter, in seconds since the Unix epoch, and as text.
    pub not_after: i64,
    pub expires: String,
}

#[cfg(feature = "server")]
impl CertInfo {
    /// `None` when the first certificate does not parse as X.509 (rustls served it anyway).
    fn of(key: &CertifiedKey) -> Option<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert.first()?).ok()?;
        let not_after = &cert.validity().not_after;
        Some(CertInfo {
            subject: cert.subject().to_string(),
            not_after: not_after.timestamp(),
            expires: not_after.to_string(),
        })
    }

    pub fn log(&self, what: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (subject, expires) = (&self.subject, &self.expires);
        if self.not_after <= now {
            warn!(
                subject,
                expires, "{what}; it has EXPIRED: clients will refuse it"
            );
        } else {
            info!(subject, expires, "{what}");
        }
    }
}

/// What one look at the files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// Same bytes as the pair in use (or as the pair last rejected).
    Unchanged,
    /// A new pair is now served to new connections.
    Reloaded,
    /// The files changed but do not load; the pair in use stays.
    Rejected(TlsError),
}

/// The certificate in use, handed to rustls for every handshake, and the files it came from.
pub struct ReloadingCert {
    files: TlsConfig,
    current: RwLock<Arc<CertifiedKey>>,
    /// sha256 of the cert and key bytes in use, and of the last pair rejected (so a broken
    /// pair is reported once, not on every poll).
    seen: Mutex<(Fingerprint, Option<Fingerprint>)>,
}

type Fingerprint = [u8; 32];

fn fingerprint(cert_pem: &[u8], key_pem: &[u8]) -> Fingerprint {
    let mut h = Sha256::new();
    h.update((cert_pem.len() as u64).to_be_bytes());
    h.update(cert_pem);
    h.update(key_pem);
    h.finalize().into()
}

impl ReloadingCert {
    /// Loads the pair once; an error here stops the server from starting.
    pub fn load(files: &TlsConfig) -> Result<Arc<ReloadingCert>, TlsError> {
        let (cert_pem, key_pem) = (read(CERT, &files.cert_file)?, read(KEY, &files.key_file)?);
        let key = parse(&cert_pem, &files.cert_file, &key_pem, &files.key_file)?;
        Ok(Arc::new(ReloadingCert {
            files: files.clone(),
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new((fingerprint(&cert_pem, &key_pem), None)),
        }))
    }

    pub fn cert_file(&self) -> &Path {
        &self.files.cert_file
    }

    /// The subject and expiry of the certificate in use.
    #[cfg(feature = "server")]
    pub fn info(&self) -> Option<CertInfo> {
        CertInfo::of(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads both files and swaps in the pair if it changed and loads.
    pub fn poll(&self) -> Reload {
        let (cert_file, key_file) = (&self.files.cert_file, &self.files.key_file);
        let files = read(CERT, cert_file).and_then(|c| Ok((c, read(KEY, key_file)?)));
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let (cert_pem, key_pem) = match files {
            Ok(pair) => pair,
            // A file missing for a moment (mid-rename) is as much a change as new bytes.
            Err(e) => return Self::reject(&mut seen, fingerprint(&[], e.problem.as_bytes()), e),
        };
        let print = fingerprint(&cert_pem, &key_pem);
        if print == seen.0 || Some(print) == seen.1 {
            return Reload::Unchanged;
        }
        match parse(&cert_pem, cert_file, &key_pem, key_file) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                *seen = (print, None);
                Reload::Reloaded
            }
            Err(e) => Self::reject(&mut seen, print, e),
        }
    }

    fn reject(
        seen: &mut (Fingerprint, Option<Fingerprint>),
        print: Fingerprint,
        e: TlsError,
    ) -> Reload {
        if seen.1 == Some(print) {
            return Reload::Unchanged;
        }
        seen.1 = Some(print);
        Reload::Rejected(e)
    }

    /// Polls every `reload_interval` on a thread of its own until the process exits (the work
    /// is two small blocking file reads; it needs no runtime). `on_poll` counts outcomes.
    pub fn watch(self: &Arc<Self>, on_poll: impl Fn(&Reload) + Send + 'static) {
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tls-reload".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(this.files.reload_interval);
                    let outcome = this.poll();
                    this.log(&outcome);
                    on_poll(&outcome);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the TLS reload thread; certificates will not be reloaded");
        }
    }

    fn log(&self, outcome: &Reload) {
        let cert_file = self.files.cert_file.display().to_string();
        match outcome {
            Reload::Unchanged => {}
            Reload::Reloaded => info!(
                cert_file,
                "TLS certificate reloaded; new connections get it"
            ),
            Reload::Rejected(e) => warn!(error = %e,
                "TLS files changed but cannot be used; still serving the previous certificate"),
        }
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Two self-signed pairs (CN a.test and b.test), made once with the openssl CLI and kept
    /// as test data: loading does not look at validity dates.
    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/tls")
            .join(name)
    }

    fn files(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            reload_interval: Duration::from_secs(1),
        }
    }

    fn install(dir: &Path, pair: &str) {
        std::fs::copy(data(&format!("{pair}.pem")), dir.join("cert.pem")).unwrap();
        std::fs::copy(data(&format!("{pair}.key")), dir.join("key.pem")).unwrap();
    }

    fn served(cert: &ReloadingCert) -> Vec<u8> {
        cert.current.read().unwrap().cert[0].to_vec()
    }

    fn leaf(pair: &str) -> Vec<u8> {
        let pem = std::fs::read(data(&format!("{pair}.pem"))).unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap().to_vec()
    }

    #[cfg(feature = "server")]
    #[test]
    fn a_good_pair_loads_and_tells_its_subject_and_expiry() {
        let key = load(&data("a.pem"), &data("a.key")).unwrap();
        let info = CertInfo::of(&key).unwrap();
        assert_eq!(info.subject, "CN=a.test");
        // notAfter=Oct 29 12:53:11 2126 GMT (openssl x509 -enddate)
        assert_eq!(info.not_after, 4_948_951_991, "{info:?}");
        assert!(info.expires.contains("2126"), "{info:?}");
    }

    #[test]
    fn errors_name_the_field_and_the_file() {
        let e = load(&data("missing.pem"), &data("a.key")).unwrap_err();
        assert_eq!(e.field, "cert_file");
        assert!(
            e.to_string().contains("missing.pem\": cannot be read"),
            "{e}"
        );

        let e = load(&data("a.pem"), &data("b.key")).unwrap_err();
        assert_eq!(e.field, "key_file");
        assert!(
            e.to_string().contains("does not match the certificate in"),
            "{e}"
        );

        // A key where the certificate belongs, and the other way round.
        let e = load(&data("a.key"), &data("a.key")).unwrap_err();
        assert_eq!(
            (e.field, e.problem.contains("no PEM certificate")),
            ("cert_file", true)
        );
        let e = load(&data("a.pem"), &data("a.pem")).unwrap_err();
        assert_eq!(
            (e.field, e.problem.contains("no PEM private key")),
            ("key_file", true)
        );
    }

    #[test]
    fn damaged_pem_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(data("a.pem")).unwrap();
        let cut = text.replace("-----END CERTIFICATE-----", "");
        std::fs::write(dir.path().join("cut.pem"), cut).unwrap();
        let e = load(&dir.path().join("cut.pem"), &data("a.key")).unwrap_err();
        assert_eq!(e.field, "cert_file", "{e}");
        assert!(e.problem.contains("is not valid PEM"), "{e}");
    }

    #[test]
    fn a_changed_pair_is_swapped_in_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        install(dir.path(), "a");
        let cert = ReloadingCert::load(&files(dir.path())).unwrap();
        assert_eq!(cert.poll(), Reload::Unchanged);
        assert_eq!(served(&cert), leaf("a"));

        install(dir.path(), "b");
        assert_eq!(cert.poll(), Reload::Reloaded);
        assert_eq!(served(&cert), leaf("b"));

        // The new cert with the old key: rejected once, b stays.
        std::fs::copy(data("a.pem"), dir.path().join("cert.pem")).unwrap();
        assert!(matches!(cert.poll(), Reload::Rejected(e) if e.field == "key_file"));
        assert_eq!(cert.poll(), Reload::Unchanged);
        assert_eq!(served(&cert), leaf("b"));

        // The matching key arrives (a rotation that wrote the files one at a time).
        std::fs::copy(data("a.key"), dir.path().join("key.pem")).unwrap();
        assert_eq!(cert.poll(), Reload::Reloaded);
        assert_eq!(served(&cert), leaf("a"));

        std::fs::remove_file(dir.path().join("key.pem")).unwrap();
        assert!(matches!(cert.poll(), Reload::Rejected(e) if e.problem.contains("cannot be read")));
        assert_eq!(served(&cert), leaf("a"));
    }
}
