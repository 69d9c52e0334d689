//! The split topology on loopback, as Kubernetes would run it: two generator processes, one
//! ranker and a cascade that holds no model. The cascade reports SERVING only once both
//! upstreams do; captions equal the combined topology's for the same seed; the key reaches every
//! tier's log; an expired call never reaches BLIP; and under concurrent load a generator killed
//! with SIGKILL costs at most the calls it held, while traffic returns to it once it restarts.

mod common;

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use caption_cascade::pb::{self, cascade_client::CascadeClient};
use common::{http::http_server, png_image, scenes::draw_scene, shared_channel, ServerProcess};
use rand::{rngs::StdRng, SeedableRng};
use tonic::{transport::Channel, Code};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// A server process listening on `listen`, its metrics on a port of their own, logging at INFO.
fn tier(listen: &str, args: &[&str]) -> common::process::Starting {
    common::server(args).listen(listen).metrics().env("RUST_LOG", "info").env("NO_COLOR", "1").spawn()
}

/// The sum of the samples of `process`'s metrics whose line starts with `prefix`; 0 when the
/// process does not answer.
async fn metric(process: &ServerProcess, prefix: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://{}/metrics", process.metrics())).await else { return 0.0 };
    let text = resp.text().await.unwrap_or_default();
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// A loopback address no other test process listens on: 127.B.C.D from this process's id (every
/// id below 6.5 million has its own; Linux routes all of 127/8 to lo). A generator killed here is
/// restarted on the port it had, and on an address of our own nothing else can take that port
/// while it is free, as any process's port 0 could on 127.0.0.1.
fn own_loopback_ip() -> String {
    let pid = std::process::id();
    format!("127.{}.{}.{}", 100 + pid / 254 / 256 % 100, pid / 254 % 256, 1 + pid % 254)
}

fn signal(process: &ServerProcess, name: &str) {
    let sent = Command::new("kill").args([name, &process.id().to_string()]).status().unwrap();
    assert!(sent.success(), "kill {name}");
}

async fn health(addr: SocketAddr, service: &str) -> Option<i32> {
    let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.ok()?;
    let resp = HealthClient::new(ch).check(HealthCheckRequest { service: service.into() }).await.ok()?;
    Some(resp.into_inner().status)
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request(png: Vec<u8>, seed: u64) -> pb::CaptionRequest {
    pb::CaptionRequest {
        image: png_image(png),
        params: Some(pb::GenerationParams { num_candidates: Some(6), seed: Some(seed), ..Default::default() }),
        top_k: Some(3),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_deployment_captions_like_the_combined_one_and_survives_a_killed_generator() {
    let generator = ["--services", "generator"];
    let g1 = tier(&format!("{}:0", own_loopback_ip()), &generator);
    let (g2, ranker) = (tier("127.0.0.1:0", &generator), tier("127.0.0.1:0", &["--services", "ranker"]));
    let (mut g1, g2, ranker) = (g1.ready().await, g2.ready().await, ranker.ready().await);
    let (g1_addr, g2_addr) = (g1.addr(), g2.addr());
    assert!(ranker.log().contains("generator=false ranker=true"), "the ranker loads CLIP only");
    // The ranker stopped, so the cascade starts with one upstream that does not answer.
    signal(&ranker, "-STOP");
    let endpoints = format!("http://{g1_addr},http://{g2_addr}");
    let ranker_endpoint = format!("http://localhost:{}", ranker.addr().port());
    let cascade = tier(
        "127.0.0.1:0",
        &[
            "--services",
            "cascade",
            "--generator-endpoint",
            &endpoints,
            "--ranker-endpoint",
            &ranker_endpoint,
            "--upstream-check-interval-ms",
            "200",
            "--fetch-allow",
            "127.0.0.1/32",
        ],
    )
    .ready()
    .await;
    let c_addr = cascade.addr();
    wait_for("the cascade answers health", Duration::from_secs(30), async || {
        health(c_addr, "caption.v1.Cascade").await.is_some()
    })
    .await;
    assert_eq!(
        health(c_addr, "caption.v1.Cascade").await,
        Some(ServingStatus::NotServing as i32),
        "SERVING while its ranker does not answer"
    );
    assert!(!cascade.log().contains("loading models"), "a cascade over remote models loads none");
    signal(&ranker, "-CONT");
    wait_for("the cascade turns SERVING", Duration::from_secs(60), async || {
        health(c_addr, "caption.v1.Cascade").await == Some(ServingStatus::Serving as i32)
    })
    .await;
    // A generator process serves Generate only.
    let ch = Channel::from_shared(format!("http://{g2_addr}")).unwrap().connect().await.unwrap();
    let err = CascadeClient::new(ch).caption(request(vec![1], 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // Same seed, same captions as the combined topology.
    let split = common::channel(c_addr).await;
    let mut rng = StdRng::seed_from_u64(12);
    let scenes: Vec<Vec<u8>> = (0..4).map(|_| draw_scene(&mut rng).png()).collect();
    let mut combined = CascadeClient::new(shared_channel().await);
    let mut client = CascadeClient::new(split.clone());
    for (i, png) in scenes.iter().enumerate() {
        let a = combined.caption(request(png.clone(), i as u64)).await.unwrap().into_inner();
        let b = client.caption(request(png.clone(), i as u64)).await.unwrap().into_inner();
        assert_eq!(a.candidates, b.candidates, "scene {i}");
        assert_eq!(a.key, b.key);
        let texts = |r: &pb::CaptionResponse| r.captions.iter().map(|c| (c.text.clone(), c.count)).collect::<Vec<_>>();
        assert_eq!(texts(&a), texts(&b), "scene {i}");
        for (x, y) in a.captions.iter().zip(&b.captions) {
            assert!((x.probability - y.probability).abs() < 1e-5);
        }
        // The correlation key is in every tier's log lines for the call.
        for process in [&cascade, &ranker] {
            assert!(process.log().contains(&a.key), "process {} misses the key {}", process.id(), a.key);
        }
        assert!(g1.log().contains(&a.key) || g2.log().contains(&a.key), "no generator logged {}", a.key);
    }
    // A URL's key reaches the upstreams as scheme, host and path: its query may be a credential.
    let http = http_server(scenes[0].clone()).await;
    let url = format!("http://{http}/scene.png?X-Amz-Signature=SIGNED");
    let by_url = pb::CaptionRequest {
        image: Some(pb::Image { source: Some(pb::image::Source::Url(url.clone())) }),
        ..request(vec![], 0)
    };
    assert_eq!(client.caption(by_url).await.unwrap().into_inner().key, url);
    let sent = format!("sent_key=http://{http}/scene.png ");
    assert!(ranker.log().contains(&sent), "the ranker logs the label of the key:\n{}", ranker.log());
    for process in [&cascade, &ranker, &g1, &g2] {
        assert!(!process.log().contains("SIGNED"), "process {} logged a URL's query", process.id());
    }

    // An expired call never reaches BLIP.
    let generated = metric(&g1, "caption_requests_total{service=\"Generate\"").await
        + metric(&g2, "caption_requests_total{service=\"Generate\"").await;
    let mut expired = tonic::Request::new(request(scenes[0].clone(), 99));
    expired.set_timeout(Duration::from_nanos(1));
    let err = client.caption(expired).await.unwrap_err();
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{err:?}");
    let after = metric(&g1, "caption_requests_total{service=\"Generate\"").await
        + metric(&g2, "caption_requests_total{service=\"Generate\"").await;
    assert_eq!(generated, after, "an expired call reached a generator");

    // The cascade tier checks what holds whatever the model, with the generators' limit flags:
    // a bad field is refused there, naming it, and never reaches a generator.
    for (params, field) in [
        (pb::GenerationParams { top_p: Some(5.0), ..Default::default() }, "top_p"),
        (pb::GenerationParams { num_candidates: Some(1000), ..Default::default() }, "num_candidates"),
        (pb::GenerationParams { decoding: 42, ..Default::default() }, "decoding"),
    ] {
        let bad = pb::CaptionRequest { params: Some(params), ..request(scenes[0].clone(), 7) };
        let err = client.caption(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    let after_invalid = metric(&g1, "caption_requests_total{service=\"Generate\"").await
        + metric(&g2, "caption_requests_total{service=\"Generate\"").await;
    assert_eq!(after, after_invalid, "an invalid call reached a generator");

    // Concurrent load; one generator is killed in the middle, then restarted.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let callers: Vec<_> = (0..6)
        .map(|c| {
            let (mut client, stop, ok, failed) =
                (CascadeClient::new(split.clone()), stop.clone(), ok.clone(), failed.clone());
            let scenes = scenes.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let req = request(scenes[(n as usize + c) % scenes.len()].clone(), 1000 * c as u64 + n);
                    match client.caption(req).await {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            eprintln!("call failed: {e:?}");
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                    n += 1;
                }
            })
        })
        .collect();
    wait_for("load is flowing", Duration::from_secs(30), async || ok.load(Ordering::SeqCst) >= 12).await;
    let g1_inflight = metric(&g1, "caption_inflight_requests{service=\"Generate\"}").await;
    g1.kill();
    let killed_at = ok.load(Ordering::SeqCst);
    wait_for("calls go on after the kill", Duration::from_secs(30), async || {
        ok.load(Ordering::SeqCst) >= killed_at + 12
    })
    .await;
    assert_eq!(metric(&cascade, "caption_upstream_replicas{service=\"caption.v1.Generator\"}").await, 1.0);
    let lost = failed.load(Ordering::SeqCst);
    println!(
        "killed a generator holding {g1_inflight} calls: {lost} calls failed, retries {}",
        metric(&cascade, "caption_upstream_retries_total").await
    );
    // The calls in flight on the killed replica are retried on the other: none fails.
    assert_eq!(lost, 0, "{lost} calls failed across the kill");
    // Back again on the same address: it is found and given traffic.
    let g1 = tier(&g1_addr.to_string(), &generator).ready().await;
    wait_for("the restarted generator takes traffic", Duration::from_secs(60), async || {
        metric(&g1, "caption_requests_total{service=\"Generate\",code=\"OK\"}").await >= 3.0
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), lost, "no failure once the replica set had settled");
    println!("{} calls answered in all", ok.load(Ordering::SeqCst));
    drop(g2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hop_to_the_upstreams_can_use_tls_and_a_token() {
    let tls = common::TlsFiles::new("split-tls");
    let (ca, cert, key) = (&tls.ca, &tls.cert, &tls.key);
    let dir = tls.dir.clone();
    let token = dir.join("token");
    std::fs::write(&token, "inner-secret\n").unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "guess\n").unwrap();
    // Both upstreams serve TLS and want the token; the cascades start once their ports are known.
    let secured =
        ["--tls-cert", cert.as_str(), "--tls-key", key.as_str(), "--auth-token-file", token.to_str().unwrap()];
    let generator = tier("127.0.0.1:0", &[&["--services", "generator"][..], &secured].concat());
    let ranker = tier("127.0.0.1:0", &[&["--services", "ranker"][..], &secured].concat());
    let (generator, ranker) = (generator.ready().await, ranker.ready().await);
    let (generator_endpoint, ranker_endpoint) = (
        format!("https://localhost:{}", generator.addr().port()),
        format!("https://localhost:{}", ranker.addr().port()),
    );
    let cascade_with = |token_file: &std::path::Path| {
        let args = [
            "--services",
            "cascade",
            "--generator-endpoint",
            &generator_endpoint,
            "--ranker-endpoint",
            &ranker_endpoint,
            "--upstream-ca",
            ca,
            "--upstream-token-file",
            token_file.to_str().unwrap(),
            "--upstream-check-interval-ms",
            "200",
        ];
        tier("127.0.0.1:0", &args)
    };
    let (good, bad) = (cascade_with(&token), cascade_with(&wrong));
    let (good, bad) = (good.ready().await, bad.ready().await);
    let png = draw_scene(&mut StdRng::seed_from_u64(4)).png();
    for (addr, want) in [(good.addr(), Code::Ok), (bad.addr(), Code::Unauthenticated)] {
        wait_for("the cascade turns SERVING over TLS", Duration::from_secs(60), async || {
            health(addr, "caption.v1.Cascade").await == Some(ServingStatus::Serving as i32)
        })
        .await;
        let mut client = CascadeClient::new(common::channel(addr).await);
        let got = client.caption(request(png.clone(), 1)).await.map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        assert_eq!(got, want, "cascade at {addr}");
    }
}
