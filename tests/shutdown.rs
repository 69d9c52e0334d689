//! SIGTERM as Kubernetes sends it: health turns NOT_SERVING, the calls already accepted finish
//! with their answers, and the process exits 0.

mod common;

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use caption_cascade::pb::{self, cascade_client::CascadeClient};
use common::{channel, png_image, scenes::draw_scene, server};
use rand::{rngs::StdRng, SeedableRng};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// Caption calls the server is serving now, from its metrics endpoint (0 before it answers).
async fn inflight(metrics: SocketAddr) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://{metrics}/metrics")).await else { return 0.0 };
    let text = resp.text().await.unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with(r#"caption_inflight_requests{service="Caption"}"#));
    line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_accepted_calls_then_exits_cleanly() {
    let mut server = server(&[]).metrics().start().await;
    let metrics = server.metrics();
    let ch = channel(server.addr()).await;
    let scene = draw_scene(&mut StdRng::seed_from_u64(21));
    // Enough work that the calls are still running when the signal arrives.
    let params = pb::GenerationParams { num_candidates: Some(32), max_length: Some(40), ..Default::default() };
    let calls: Vec<_> = (0..6)
        .map(|seed| {
            let mut client = CascadeClient::new(ch.clone());
            let mut params = params.clone();
            params.seed = Some(seed);
            let req = pb::CaptionRequest {
                image: png_image(scene.png()),
                params: Some(params),
                top_k: Some(1),
                ..Default::default()
            };
            tokio::spawn(async move {
                let resp = client.caption(req).await;
                (resp, Instant::now())
            })
        })
        .collect();
    // Signal once the server has accepted all of them, so every one must be drained.
    let start = Instant::now();
    while inflight(metrics).await < calls.len() as f64 {
        assert!(start.elapsed() < Duration::from_secs(10), "the calls were never all in flight");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let kill = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let signalled = Instant::now();

    // Health turns NOT_SERVING once the signal is handled (or the server is already gone).
    let mut health = HealthClient::new(ch.clone());
    loop {
        let req = HealthCheckRequest { service: "caption.v1.Cascade".into() };
        match health.check(req).await {
            Ok(resp) if resp.get_ref().status == ServingStatus::Serving as i32 => {}
            Ok(resp) => {
                assert_eq!(resp.into_inner().status, ServingStatus::NotServing as i32, "health during the drain");
                break;
            }
            Err(_) => break,
        }
        assert!(signalled.elapsed() < Duration::from_secs(5), "health still SERVING 5 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for call in calls {
        let (resp, at) = call.await.unwrap();
        let resp = resp.expect("an accepted call finishes during the drain");
        assert_eq!(resp.into_inner().captions.len(), 1);
        assert!(at > signalled, "a call ended before the signal: it was not drained");
    }
    let start = Instant::now();
    let code = loop {
        if let Some(code) = server.child().try_wait().unwrap() {
            break code;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the server did not exit after draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(code.success(), "exit status {code}");
}
