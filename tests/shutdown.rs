//! SIGTERM as Kubernetes sends it: health turns NOT_SERVING, the calls already accepted finish
//! with their answers, and the process exits 0.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use caption_cascade::api::pb::{self, cascade_client::CascadeClient};
use common::{channel, free_port, png_image, scenes::draw_scene};
use rand::{rngs::StdRng, SeedableRng};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_accepted_calls_then_exits_cleanly() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .args(["serve", "--device", "cpu", "--listen", &addr])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server");
    let ch = channel(addr.parse().unwrap()).await;
    let scene = draw_scene(&mut StdRng::seed_from_u64(21));
    // Enough work that the calls are still running when the signal arrives.
    let params = pb::GenerationParams { num_candidates: Some(32), max_length: Some(40), ..Default::default() };
    let calls: Vec<_> = (0..6)
        .map(|seed| {
            let mut client = CascadeClient::new(ch.clone());
            let mut params = params.clone();
            params.seed = Some(seed);
            let req = pb::CaptionRequest { image: png_image(scene.png()), params: Some(params), top_k: Some(1) };
            tokio::spawn(async move {
                let resp = client.caption(req).await;
                (resp, Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let signalled = Instant::now();

    // Health says NOT_SERVING while the server drains (or the server is already gone).
    let mut health = HealthClient::new(ch.clone());
    let status = health.check(HealthCheckRequest { service: "caption.v1.Cascade".into() }).await;
    if let Ok(resp) = status {
        assert_eq!(resp.into_inner().status, ServingStatus::NotServing as i32, "health during the drain");
    }
    let mut after_signal = 0;
    for call in calls {
        let (resp, at) = call.await.unwrap();
        let resp = resp.expect("an accepted call finishes during the drain");
        assert_eq!(resp.into_inner().captions.len(), 1);
        after_signal += usize::from(at > signalled);
    }
    eprintln!("{after_signal} of the calls finished after the signal");
    assert!(after_signal > 0, "every call ended before the signal: nothing was drained");
    let start = Instant::now();
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the server did not exit after draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(code.success(), "exit status {code}");
}
