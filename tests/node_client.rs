//! A client written in Node.js: @grpc/grpc-js with @grpc/proto-loader loading proto/ at runtime
//! (as a Node service would, no generated code) calls Generate, Rank, Caption and CaptionStream
//! and sees the same captions and status codes a Rust caller sees — in plaintext, and over TLS
//! with a bearer token. `make test` installs tests/clients/node's pinned packages with `npm ci`.

mod common;

use std::{net::SocketAddr, path::Path, process::Command};

use common::{channel, server_addr};

/// Ends the server when the test ends, also when it fails.
/// Runs tests/clients/node/client.js against `addr` with `extra` arguments; returns what it saw.
async fn node_client(addr: SocketAddr, extra: Vec<String>) -> serde_json::Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = format!("{root}/tests/clients/node");
    assert!(
        Path::new(&format!("{dir}/node_modules/@grpc/grpc-js")).is_dir(),
        "{dir}/node_modules is missing: run `make test`, or `npm ci` in {dir}"
    );
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let image = format!("{root}/examples/images/scene_1.png");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&node)
            .args([&format!("{dir}/client.js"), &addr.to_string(), &image])
            .args(extra)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("{node}: {e} (install Node.js, e.g. apt-get install nodejs npm)"))
    })
    .await
    .unwrap();
    assert!(out.status.success(), "node client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("node client printed no JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

/// What every run must have seen, checked against the same call from a Rust client.
async fn check(seen: &serde_json::Value) {
    let rust = common::reference_caption().await;
    assert_eq!(seen["caption"][0]["text"], rust.captions[0].text.as_str(), "{seen}");
    assert_eq!(seen["caption"][0]["count"], rust.captions[0].count, "{seen}");
    assert_eq!(seen["caption_candidates"], rust.candidates.len(), "{seen}");
    assert!(seen["key"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(seen["key"], rust.key.as_str());

    let candidates = seen["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 4, "Generate's num_candidates: {seen}");
    assert!(candidates.iter().all(|c| !c.as_str().unwrap().is_empty()));
    assert!(seen["token_ids"].as_array().unwrap().iter().all(|n| n.as_u64().unwrap() > 1));

    let rank = seen["rank"].as_array().unwrap();
    assert_eq!(rank.len(), 2);
    assert_eq!(rank[0]["index"], 0, "the true caption ranks first: {rank:?}");
    let total: f64 = rank.iter().map(|r| r["probability"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "Rank's probabilities sum to {total}");

    assert_eq!(seen["bad_image"]["code"], "INVALID_ARGUMENT", "{seen}");
    assert_eq!(seen["bad_param"]["code"], "INVALID_ARGUMENT", "{seen}");
    assert!(seen["bad_param"]["details"].as_str().unwrap().starts_with("top_p"));

    // The stream answers both; the bad image with google.rpc.Status (code 3: INVALID_ARGUMENT).
    assert_eq!(seen["stream"]["good"]["captions"][0], rust.captions[0].text.as_str(), "{seen}");
    assert_eq!(seen["stream"]["bad"]["error"]["code"], 3, "{seen}");
}

#[tokio::test]
async fn node_client_calls_every_service() {
    let addr = server_addr();
    channel(addr).await; // ready
    let seen = node_client(addr, vec![]).await;
    check(&seen).await;
}

#[tokio::test]
async fn node_client_calls_over_tls_with_a_bearer_token() {
    let tls = common::TlsFiles::new("node-tls");
    let server = common::server(&["--tls-cert", &tls.cert, "--tls-key", &tls.key])
        .health()
        .env("CAPTION_AUTH_TOKEN", "node-secret")
        .start()
        .await;
    let addr = server.addr();
    // Readiness on the plaintext health port: the main one needs TLS and the token.
    channel(server.health()).await;
    let seen = node_client(addr, vec!["--tls-ca".into(), tls.ca.clone(), "--token".into(), "node-secret".into()]).await;
    drop(server);
    check(&seen).await;
    assert_eq!(seen["no_token"]["code"], "UNAUTHENTICATED", "{}", seen["no_token"]);
}
