//! The Prometheus endpoint of a server process of its own after real traffic: request counts by
//! service and code, latency histograms, batch sizes, decode steps and image cache hits all move,
//! by exactly what this test sent; `/health` and the content type are the exporter's.

mod common;

use std::net::SocketAddr;

use caption_cascade::pb::{self, cascade_client::CascadeClient, ranker_client::RankerClient};
use common::{channel, png_image, scenes::draw_scene, server};
use rand::{rngs::StdRng, SeedableRng};

async fn scrape(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap()
}

/// The value of the first sample line starting with `prefix` (name plus labels), if any.
fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let server = server(&[]).metrics().start().await;
    let metrics_addr = server.metrics();
    let ch = channel(server.addr()).await;
    let mut cascade = CascadeClient::new(ch.clone());
    let scene = draw_scene(&mut StdRng::seed_from_u64(9));
    for _ in 0..3 {
        cascade.caption(pb::CaptionRequest { image: png_image(scene.png()), ..Default::default() }).await.unwrap();
    }
    let bad = pb::CaptionRequest { image: png_image(b"nope".to_vec()), ..Default::default() };
    assert!(cascade.caption(bad).await.is_err());
    let mut ranker = RankerClient::new(ch);
    ranker
        .rank(pb::RankRequest { image: png_image(scene.png()), captions: vec!["a".into(), "b".into()] })
        .await
        .unwrap();

    let text = scrape(metrics_addr).await;
    let ok = value(&text, r#"caption_requests_total{service="Caption",code="OK"}"#);
    assert_eq!(ok, Some(3.0), "{text}");
    assert_eq!(value(&text, r#"caption_requests_total{service="Caption",code="INVALID_ARGUMENT"}"#), Some(1.0));
    assert_eq!(value(&text, r#"caption_requests_total{service="Rank",code="OK"}"#), Some(1.0));
    assert_eq!(value(&text, r#"caption_request_duration_seconds_count{service="Caption"}"#), Some(4.0));
    assert!(value(&text, r#"caption_batch_size_count{model="generate"}"#).unwrap() >= 3.0);
    assert!(value(&text, r#"caption_batch_size_count{model="rank"}"#).unwrap() >= 4.0);
    assert!(value(&text, "caption_decode_steps_total").unwrap() >= 3.0);
    assert!(value(&text, r#"caption_queue_duration_seconds_bucket{model="generate",le="+Inf"}"#).unwrap() >= 3.0);
    assert!(value(&text, r#"caption_compute_duration_seconds_count{model="rank"}"#).unwrap() >= 4.0);
    // The same image bytes three times: later calls hit the cache.
    assert!(value(&text, "caption_image_cache_hits_total").unwrap() >= 2.0);
    assert_eq!(value(&text, r#"caption_inflight_requests{service="Caption"}"#), Some(0.0));
    assert!(text.contains("caption_queue_depth{model=\"generate\"}"));

    let resp = reqwest::get(format!("http://{metrics_addr}/metrics")).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/plain; version=0.0.4");
    let health = reqwest::get(format!("http://{metrics_addr}/health")).await.unwrap();
    assert_eq!((health.status().as_u16(), health.text().await.unwrap().as_str()), (200, "OK"));
}
