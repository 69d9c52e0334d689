//! A client written in another language: Python stubs generated from our proto call each service
//! and see the same captions, orderings and status codes a Rust caller sees.

mod common;

use std::process::Command;

use caption_cascade::api::pb;
use common::{channel, server_addr};

#[tokio::test]
async fn python_stubs_call_every_service() {
    let root = env!("CARGO_MANIFEST_DIR");
    let addr = server_addr();
    channel(addr).await; // ready
    let python = format!("{root}/.venv/bin/python");
    let image = format!("{root}/examples/images/scene_1.png");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args([&format!("{root}/tests/clients/python_client.py"), &addr.to_string(), &image])
            .output()
            .unwrap_or_else(|e| panic!("{python}: {e} (make test installs tests/clients/requirements.txt)"))
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The same call from a Rust client gives the same answer.
    let mut client = caption_cascade::api::pb::cascade_client::CascadeClient::new(channel(addr).await);
    let image = std::fs::read(format!("{root}/examples/images/scene_1.png")).unwrap();
    let rust = client
        .caption(pb::CaptionRequest {
            image: common::png_image(image),
            params: Some(pb::GenerationParams {
                seed: Some(1),
                decoding: pb::Decoding::Greedy as i32,
                ..Default::default()
            }),
            top_k: Some(3),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen["caption"][0]["text"], rust.captions[0].text.as_str());
    assert!(seen["key"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(seen["candidates"].as_array().unwrap().len(), 4);
    let rank = seen["rank"].as_array().unwrap();
    assert_eq!(rank[0]["index"], 0, "the true caption ranks first: {rank:?}");
    let total: f64 = rank.iter().map(|r| r["probability"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4);
    assert_eq!(seen["bad_image"]["code"], "INVALID_ARGUMENT");
    assert_eq!(seen["bad_param"]["code"], "INVALID_ARGUMENT");
    assert!(seen["bad_param"]["details"].as_str().unwrap().starts_with("top_p"));
}
