//! Shared test harness: one in-process server per test binary on 127.0.0.1:0, running on its
//! own runtime thread so every test's runtime can reach it, and clients for it.

#![allow(dead_code)]

pub mod scenes;

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use caption_cascade::{api::pb, config::EngineArgs};
use clap::Parser;
use tonic::transport::Channel;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

#[derive(Parser)]
struct EngineCli {
    #[command(flatten)]
    engine: EngineArgs,
}

/// Engine settings as the CLI would parse them from `args`, with the embedded models.
pub fn engine_args(args: &[&str]) -> EngineArgs {
    let root = env!("CARGO_MANIFEST_DIR");
    let blip = format!("{root}/models/shapes-blip");
    let clip = format!("{root}/models/shapes-clip");
    let mut argv = vec!["test", "--device", "cpu", "--blip-model", &blip, "--clip-model", &clip];
    argv.extend_from_slice(args);
    EngineCli::parse_from(argv).engine
}

/// Address of the shared test server, started on first use.
pub fn server_addr() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start_server(engine_args(&[])))
}

/// Starts a server with `engine` on a runtime thread of its own; returns once it listens.
pub fn start_server(engine: EngineArgs) -> SocketAddr {
    start_server_with_metrics(engine, None)
}

/// As [`start_server`], also serving Prometheus metrics on `metrics` when given.
pub fn start_server_with_metrics(engine: EngineArgs, metrics: Option<SocketAddr>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            if let Some(addr) = metrics {
                caption_cascade::telemetry::install_exporter(addr).expect("metrics exporter");
            }
            let cascade = caption_cascade::app::build_cascade(&engine).expect("models load");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send addr");
            caption_cascade::api::serve(listener, cascade, 32 << 20, std::future::pending()).await.expect("serve");
        });
    });
    // Each test runs its own runtime; readiness is polled there by `channel`.
    rx.recv().expect("server thread started")
}

/// A port that was free a moment ago, for listeners that cannot bind port 0 themselves.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
