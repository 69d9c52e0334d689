//! A client written in another language: Python stubs generated from our proto call each service
//! and see the same captions, orderings and status codes a Rust caller sees — in plaintext, and
//! over TLS with a bearer token as a deployment that turns both on is called.

mod common;

use std::{net::SocketAddr, process::Command};

use common::{channel, server_addr};

/// Runs the Python client against `addr` with `extra` arguments; returns what it saw.
async fn python_client(addr: SocketAddr, extra: Vec<String>) -> serde_json::Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = format!("{root}/.venv/bin/python");
    let image = format!("{root}/examples/images/scene_1.png");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args([&format!("{root}/tests/clients/python_client.py"), &addr.to_string(), &image])
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("{python}: {e} (make test installs tests/clients/requirements.txt)"))
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What every run must have seen, checked against the same call from a Rust client.
async fn check(seen: &serde_json::Value) {
    let rust = common::reference_caption().await;
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

#[tokio::test]
async fn python_stubs_call_every_service() {
    let addr = server_addr();
    channel(addr).await; // ready
    let seen = python_client(addr, vec![]).await;
    check(&seen).await;
}

#[tokio::test]
async fn python_stubs_call_over_tls_with_a_bearer_token() {
    let tls = common::TlsFiles::new("py-tls");
    let server = common::spawn_server(
        &["--tls-cert", &tls.cert, "--tls-key", &tls.key],
        &[("CAPTION_AUTH_TOKEN", "python-secret")],
    )
    .await;
    let addr = server.addr();
    let seen =
        python_client(addr, vec!["--tls-ca".into(), tls.ca.clone(), "--token".into(), "python-secret".into()]).await;
    drop(server);
    check(&seen).await;
    assert_eq!(seen["no_token"]["code"], "UNAUTHENTICATED", "{}", seen["no_token"]);
}
