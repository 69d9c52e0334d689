//! TLS from PEM files, reloaded when they change (a renewed certificate needs no restart), with
//! client certificates checked against a CA when one is given (mTLS).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

/// The files are looked at again at most this often, when a connection arrives.
const RECHECK: Duration = Duration::from_secs(1);

pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    state: Mutex<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    contents: [u8; 32],
    checked: Instant,
}

impl TlsFiles {
    /// Loads the certificate chain and key (and the client CA for mTLS); fails on any bad file,
    /// so a misconfigured server does not start.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<Self>, String> {
        let files = Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
            state: Mutex::new(Loaded {
                acceptor: build(cert, key, client_ca)?,
                contents: [0; 32],
                checked: Instant::now(),
            }),
        };
        files.state.lock().expect("fresh lock").contents = files.digest();
        Ok(Arc::new(files))
    }

    /// The acceptor for a new connection, rebuilt first if the files changed. A file that no
    /// longer loads keeps the previous certificate serving (and says so in the log).
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut loaded = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.checked.elapsed() >= RECHECK {
            loaded.checked = Instant::now();
            let contents = self.digest();
            if contents != loaded.contents {
                match build(&self.cert, &self.key, self.client_ca.as_deref()) {
                    Ok(acceptor) => {
                        tracing::info!(cert = %self.cert.display(), "TLS files changed: reloaded");
                        loaded.acceptor = acceptor;
                        loaded.contents = contents;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files changed but do not load: keeping the previous ones")
                    }
                }
            }
        }
        loaded.acceptor.clone()
    }

    /// What the files hold now; comparing contents, not times, also sees a Kubernetes Secret's
    /// symlink swap and edits within one timestamp tick.
    fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for path in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()].into_iter().flatten() {
            hash.update(std::fs::read(path).unwrap_or_default());
            hash.update([0xff]);
        }
        hash.finalize().into()
    }
}

fn build(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor, String> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_single_cert(chain, key).map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS certificates {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("TLS certificates {}: no certificate in the file", path.display()));
    }
    Ok(certs)
}
