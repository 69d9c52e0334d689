//! TLS from PEM files, reloaded when they change (a renewed certificate needs no restart), with
//! client certificates checked against a CA when one is given (mTLS).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio_rustls::TlsAcceptor;

use crate::watched::{Contents, FileWatch};

pub struct TlsFiles {
    /// The certificate chain, the key and, for mTLS, the client CA.
    paths: Vec<PathBuf>,
    state: Mutex<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    watch: FileWatch,
}

impl TlsFiles {
    /// Loads the certificate chain and key (and the client CA for mTLS), looked at again at most
    /// once per `recheck`; fails on any bad file, so a misconfigured server does not start.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>, recheck: Duration) -> Result<Arc<Self>, String> {
        let paths: Vec<PathBuf> =
            [Some(cert), Some(key), client_ca].into_iter().flatten().map(Path::to_path_buf).collect();
        let (watch, contents) = FileWatch::new(paths.clone(), recheck);
        let acceptor = build(&paths, contents)?;
        Ok(Arc::new(Self { paths, state: Mutex::new(Loaded { acceptor, watch }) }))
    }

    /// The acceptor for a new connection, rebuilt first if the files changed. Files that no
    /// longer load keep the previous certificate serving (and say so in the log, once a change).
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut loaded = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(contents) = loaded.watch.changed() {
            match build(&self.paths, contents) {
                Ok(acceptor) => {
                    tracing::info!(cert = %self.paths[0].display(), "TLS files changed: reloaded");
                    loaded.acceptor = acceptor;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load: keeping the previous ones")
                }
            }
        }
        loaded.acceptor.clone()
    }
}

/// The acceptor from what the files at `paths` (as [`TlsFiles::paths`]) hold.
fn build(paths: &[PathBuf], contents: Contents) -> Result<TlsAcceptor, String> {
    let mut files = paths
        .iter()
        .zip(contents)
        .map(|(path, bytes)| bytes.map(|b| (b, path)).map_err(|e| format!("TLS file {}: {e}", path.display())));
    let (cert, cert_path) = files.next().expect("the certificate is watched")?;
    let (key, key_path) = files.next().expect("the key is watched")?;
    let client_ca = files.next().transpose()?;
    let chain = certificates(&cert, cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| format!("TLS key {}: {e}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((ca, ca_path)) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(&ca, ca_path)? {
                roots.add(c).map_err(|e| format!("TLS client CA {}: {e}", ca_path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS client CA {}: {e}", ca_path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_single_cert(chain, key).map_err(|e| format!("TLS certificate {}: {e}", cert_path.display()))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificates {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("TLS certificates {}: no certificate in the file", path.display()));
    }
    Ok(certs)
}
