//! TLS at the edge: an HTTPS listener's certificates, picked by SNI, and
//! reloaded when their files change.
//!
//! Each `[[listener.certificate]]` is loaded into a [`CertifiedKey`] (the key
//! must match the certificate). The store behind the rustls resolver is one
//! `ArcSwap`, so a reload changes what new handshakes get without touching
//! established connections; a pair that fails to load keeps its previous
//! version and the reason is logged. Private keys are never logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::ServerConfig;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{CertificateConfig, ListenerConfig, UnknownSni};
use crate::file_watch::{self, FileWatch};

/// One certificate and the names it serves.
#[derive(Debug)]
struct Entry {
    hosts: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// The certificates of one HTTPS listener.
#[derive(Debug)]
pub struct CertStore {
    listener: String,
    sources: Vec<CertificateConfig>,
    entries: ArcSwap<Vec<Entry>>,
    refuse_unknown: bool,
    reloads: AtomicU64,
    rejected: AtomicU64,
    last_error: ArcSwapOption<String>,
}

/// What the reloads of a listener's certificate files did, for `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertStats {
    /// Times the files were read again after a change.
    pub reloads: u64,
    /// Pairs refused on a reload (the previous one kept serving).
    pub rejected: u64,
    /// Why the latest refused pair was refused.
    pub last_error: Option<String>,
}

impl CertStore {
    /// Loads every certificate of `listener`; any failure is an error.
    pub fn load(listener: &ListenerConfig) -> Result<CertStore, String> {
        let mut entries = Vec::new();
        for (i, source) in listener.certificate.iter().enumerate() {
            let key = load_certified_key(&source.cert, &source.key)
                .map_err(|e| format!("listener `{}`: certificate[{i}]: {e}", listener.name))?;
            entries.push(Entry { hosts: lowercase(&source.hosts), key: Arc::new(key) });
        }
        Ok(CertStore {
            listener: listener.name.clone(),
            sources: listener.certificate.clone(),
            entries: ArcSwap::from_pointee(entries),
            refuse_unknown: listener.unknown_sni == UnknownSni::Refuse,
            reloads: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_error: ArcSwapOption::empty(),
        })
    }

    pub fn stats(&self) -> CertStats {
        CertStats {
            reloads: self.reloads.load(Ordering::Acquire),
            rejected: self.rejected.load(Ordering::Acquire),
            last_error: self.last_error.load_full().map(|e| e.as_ref().clone()),
        }
    }

    /// Reloads every pair from its files; a pair that fails keeps serving
    /// its previous version.
    pub fn reload(&self) {
        let current = self.entries.load();
        let mut next = Vec::with_capacity(self.sources.len());
        for (i, source) in self.sources.iter().enumerate() {
            match load_certified_key(&source.cert, &source.key) {
                Ok(key) => {
                    let changed = current.get(i).is_none_or(|old| old.key.cert != key.cert);
                    if changed {
                        tracing::info!(listener = %self.listener, cert = %source.cert.display(), "certificate reloaded");
                    }
                    next.push(Entry { hosts: lowercase(&source.hosts), key: Arc::new(key) });
                }
                Err(reason) => {
                    tracing::error!(listener = %self.listener, cert = %source.cert.display(), %reason, "certificate rejected; the previous one keeps serving");
                    self.last_error.store(Some(Arc::new(format!("{}: {reason}", source.cert.display()))));
                    self.rejected.fetch_add(1, Ordering::AcqRel);
                    if let Some(old) = current.get(i) {
                        next.push(Entry { hosts: old.hosts.clone(), key: old.key.clone() });
                    }
                }
            }
        }
        self.entries.store(Arc::new(next));
        self.reloads.fetch_add(1, Ordering::AcqRel);
    }

    /// The certificate for `sni`: exact name first, then a wildcard, then
    /// (unless the listener refuses unknown names) the first certificate.
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.load();
        if let Some(name) = sni.map(str::to_ascii_lowercase) {
            if let Some(entry) = entries.iter().find(|e| e.hosts.contains(&name)) {
                return Some(entry.key.clone());
            }
            let wildcard =
                entries.iter().find(|e| e.hosts.iter().any(|h| crate::http::target::wildcard_matches(h, &name)));
            if let Some(entry) = wildcard {
                return Some(entry.key.clone());
            }
            if self.refuse_unknown {
                return None;
            }
        }
        entries.first().map(|e| e.key.clone())
    }

    /// The files to watch for changes.
    fn files(&self) -> Vec<PathBuf> {
        self.sources.iter().flat_map(|s| [s.cert.clone(), s.key.clone()]).collect()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.pick(hello.server_name());
        if key.is_none() {
            tracing::debug!(listener = %self.listener, sni = ?hello.server_name(), "no certificate for this name; refused");
        }
        key
    }
}

fn lowercase(hosts: &[String]) -> Vec<String> {
    hosts.iter().map(|h| h.to_ascii_lowercase()).collect()
}

/// Reads a PEM certificate chain and its private key, checking they match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    // The key's error never includes key material.
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: not a usable private key: {e}", key.display()))?;
    let signing = any_supported_type(&private).map_err(|e| format!("{}: unsupported key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| format!("{} and {} do not match: {e}", cert.display(), key.display()))?;
    Ok(certified)
}

/// The rustls configuration of an HTTPS listener: TLS 1.2 and 1.3, ALPN
/// `h2` then `http/1.1`, certificates from `store`.
pub fn server_config(store: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Reloads `store` whenever one of its files changes. Dropping the returned
/// watch stops it.
pub fn watch(store: Arc<CertStore>) -> notify::Result<FileWatch> {
    let files = store.files();
    let mut dirs: Vec<PathBuf> = files.iter().map(|f| f.parent().unwrap_or(Path::new(".")).to_owned()).collect();
    dirs.sort();
    dirs.dedup();
    let relevant = move |path: &Path| {
        files.iter().any(|f| path.file_name() == f.file_name()) || file_watch::is_kubernetes_swap(path)
    };
    file_watch::watch("certificates", &dirs, relevant, move || {
        let store = store.clone();
        async move { store.reload() }
    })
}
