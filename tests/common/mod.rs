//! Shared test harness: one in-process server per test binary on 127.0.0.1:0, running on its
//! own runtime thread so every test's runtime can reach it, and clients for it. Server processes,
//! for tests that read a server's metrics or need a process of their own, are in [`process`].

#![allow(dead_code)]

pub mod decode;
pub mod http;
pub mod process;
pub mod raw;
pub mod scenes;

// Each test binary uses part of the harness.
#[allow(unused_imports)]
pub use process::{server, spawn_server, ServerProcess};

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use caption_cascade::{
    config::{EngineArgs, PolicyArgs},
    pb,
};
use clap::Parser;
use tonic::transport::Channel;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// What `serve` would run an in-process server with.
#[derive(Parser)]
pub struct EngineCli {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Engine settings as `serve` would parse them from `args`, with the embedded models.
pub fn engine_args(args: &[&str]) -> EngineCli {
    let root = env!("CARGO_MANIFEST_DIR");
    let blip = format!("{root}/models/shapes-blip");
    let clip = format!("{root}/models/shapes-clip");
    let mut argv = vec!["test", "--device", "cpu", "--blip-model", &blip, "--clip-model", &clip];
    argv.extend_from_slice(args);
    EngineCli::parse_from(argv)
}

/// Address of the shared test server, started on first use.
pub fn server_addr() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start_server(engine_args(&[])))
}

/// Starts a server with `settings` on a runtime thread of its own; returns once it listens. It has
/// no metrics: the recorder is global to a process, so every in-process server of a test binary
/// would count into the same series. Tests that read counters start a [`process`] of their own.
pub fn start_server(settings: EngineCli) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let EngineCli { engine, policy } = settings;
            let cascade = caption_cascade::app::build_captioner(&engine, &policy.policy()).expect("models load");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send addr");
            caption_cascade::api::serve(listener, cascade, Default::default(), std::future::pending()).await;
        });
    });
    // Each test runs its own runtime; readiness is polled there by `channel`.
    rx.recv().expect("server thread started")
}

/// A channel to `addr` once its health check reports SERVING (polled, no fixed sleep).
pub async fn channel(addr: SocketAddr) -> Channel {
    let endpoint = format!("http://{addr}");
    for _ in 0..600 {
        if let Ok(ch) = Channel::from_shared(endpoint.clone()).expect("uri").connect().await {
            let mut health = HealthClient::new(ch.clone());
            let req = HealthCheckRequest { service: "caption.v1.Cascade".into() };
            if let Ok(resp) = health.check(req).await {
                if resp.into_inner().status == ServingStatus::Serving as i32 {
                    return ch;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {addr} never became ready");
}

pub async fn shared_channel() -> Channel {
    channel(server_addr()).await
}

pub fn png_image(bytes: Vec<u8>) -> Option<pb::Image> {
    Some(pb::Image { source: Some(pb::image::Source::Data(bytes)) })
}

/// PEM files for TLS tests, written to a folder removed when this is dropped.
pub struct TlsFiles {
    pub dir: std::path::PathBuf,
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl TlsFiles {
    /// A fresh CA, and a server certificate it signs for localhost and 127.0.0.1, under `name`.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cc-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let write = |file: &str, text: &str| {
            let path = dir.join(file);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let (ca, cert, key) =
            (write("ca.crt", &ca_pem), write("tls.crt", &cert.pem()), write("tls.key", &key.serialize_pem()));
        Self { dir, ca, cert, key }
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the shared server answers a greedy Caption of `examples/images/scene_1.png` (seed 1, top 3):
/// the reference other-language clients' answers are checked against.
pub async fn reference_caption() -> pb::CaptionResponse {
    let image = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/images/scene_1.png")).unwrap();
    let mut client = pb::cascade_client::CascadeClient::new(shared_channel().await);
    let params = pb::GenerationParams { seed: Some(1), decoding: pb::Decoding::Greedy as i32, ..Default::default() };
    let request =
        pb::CaptionRequest { image: png_image(image), params: Some(params), top_k: Some(3), ..Default::default() };
    client.caption(request).await.unwrap().into_inner()
}
