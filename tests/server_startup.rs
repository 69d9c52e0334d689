//! The server as an operator and a load tester meet it: reflection answers (v1 and v1alpha),
//! health reports each service, a missing model folder or a listen address in use stops start-up
//! with a clear error, and `--ready-file` names the ports that port 0 gave every listener.

mod common;

use std::process::{Command, Stdio};

use common::shared_channel;
use tokio_stream::StreamExt;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

const SERVICES: [&str; 3] = ["caption.v1.Generator", "caption.v1.Ranker", "caption.v1.Cascade"];

#[tokio::test]
async fn reflection_lists_every_service_in_both_versions() {
    use tonic_reflection::pb::{v1, v1alpha};
    let ch = shared_channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "caption.v1.Cascade".into(),
        )),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
    ));
}

#[tokio::test]
async fn health_reports_each_service_serving() {
    let mut health = HealthClient::new(shared_channel().await);
    for service in SERVICES.iter().chain(&[""]) {
        let resp = health.check(HealthCheckRequest { service: service.to_string() }).await.unwrap().into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service}");
    }
}

#[test]
fn a_missing_model_folder_stops_the_server_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu", "--blip-model", "/nonexistent/blip"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot load the BLIP model from /nonexistent/blip") && stderr.contains("is not a directory"),
        "{stderr}"
    );
}

#[test]
fn an_incomplete_model_folder_names_what_is_missing() {
    let dir = std::env::temp_dir().join(format!("cc-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-clip/config.json"), dir.join("config.json"))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu", "--clip-model"])
        .arg(&dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot load the CLIP model") && stderr.contains("model.safetensors"), "{stderr}");
}

#[test]
fn a_listen_address_in_use_stops_the_server_naming_the_flag() {
    // Held for the whole test, so the address stays in use.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let runs: Vec<_> = ["--metrics-listen", "--listen", "--health-listen", "--reflection-listen"]
        .into_iter()
        .map(|flag| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_caption-cascade"));
            cmd.args(["serve", "--device", "cpu"]).current_dir(env!("CARGO_MANIFEST_DIR"));
            if flag != "--listen" {
                cmd.args(["--listen", "127.0.0.1:0"]);
            }
            let child = cmd.args([flag, &busy]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
            (flag, child)
        })
        .collect();
    for (flag, child) in runs {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {busy}: the server started; {stderr}");
        assert!(stderr.contains(&format!("error: {flag}: cannot listen on {busy}: ")), "{flag}: {stderr}");
    }
}

#[tokio::test]
async fn the_ready_file_names_every_listener_port_0_bound() {
    let server = common::server(&[]).metrics().health().reflection().env("NO_COLOR", "1").start().await;
    let bound = server.bound;
    let ports = [bound.grpc, server.metrics(), server.health(), server.reflection()].map(|a| a.port());
    assert!(ports.iter().all(|&p| p != 0), "{bound:?}");
    assert!((1..4).all(|i| !ports[..i].contains(&ports[i])), "four listeners, four ports: {bound:?}");
    // Each address answers as its listener should.
    let mut health = HealthClient::new(common::channel(server.health()).await);
    let req = HealthCheckRequest { service: "caption.v1.Cascade".into() };
    assert_eq!(health.check(req).await.unwrap().into_inner().status, ServingStatus::Serving as i32);
    let metrics = reqwest::get(format!("http://{}/metrics", server.metrics())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("caption_decode_steps_total"), "the warm-up's steps are counted: {metrics}");
    let reflection = tonic::transport::Channel::from_shared(format!("http://{}", server.reflection()))
        .unwrap()
        .connect()
        .await
        .expect("reflection listens");
    drop(reflection);
    // The start-up log names the same addresses.
    let log = server.log();
    let line = log.lines().find(|l| l.contains("serving caption.v1 and health")).expect("the serving line");
    for (field, addr) in [
        ("grpc", bound.grpc),
        ("metrics", server.metrics()),
        ("health", server.health()),
        ("reflection", server.reflection()),
    ] {
        assert!(line.contains(&format!("{field}={addr}")), "{field}={addr} missing from {line}");
    }
}
