//! Images by URL over real HTTP: the URL is the key, a fetch failure or an oversize body has the
//! right code, file:// obeys --allow-file-dir, and --max-inflight refuses calls beyond it at once.

mod common;

use caption_cascade::pb::{self, cascade_client::CascadeClient, generator_client::GeneratorClient};
use common::{channel, engine_args, http::http_server, scenes::draw_scene, start_server};
use rand::{rngs::StdRng, SeedableRng};
use tonic::Code;
use tonic_types::StatusExt;

fn url_image(url: String) -> Option<pb::Image> {
    Some(pb::Image { source: Some(pb::image::Source::Url(url)) })
}

#[tokio::test]
async fn urls_are_fetched_keyed_and_failures_have_their_codes() {
    let scene = draw_scene(&mut StdRng::seed_from_u64(11));
    let http = http_server(scene.png()).await;
    let dir = std::env::temp_dir().join(format!("cc-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("scene.png"), scene.png()).unwrap();
    // The test's HTTP server is on loopback, which the egress policy denies unless allowed.
    let addr = start_server(engine_args(&[
        "--max-image-bytes",
        "32768",
        "--allow-file-dir",
        dir.to_str().unwrap(),
        "--fetch-allow",
        "127.0.0.1/32",
    ]));
    let mut client = CascadeClient::new(channel(addr).await);

    let url = format!("http://{http}/scene.png");
    let params = Some(pb::GenerationParams { seed: Some(5), ..Default::default() });
    let by_url =
        pb::CaptionRequest { image: url_image(url.clone()), params: params.clone(), top_k: None, ..Default::default() };
    let by_url = client.caption(by_url).await.unwrap().into_inner();
    assert_eq!(by_url.key, url);
    let by_bytes =
        pb::CaptionRequest { image: common::png_image(scene.png()), params, top_k: None, ..Default::default() };
    let by_bytes = client.caption(by_bytes).await.unwrap().into_inner();
    assert_eq!(by_url.candidates, by_bytes.candidates, "the same image by URL or by bytes");

    let err = client
        .caption(pb::CaptionRequest { image: url_image(format!("http://{http}/nope.png")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("404"), "{}", err.message());

    let err = client
        .caption(pb::CaptionRequest { image: url_image(format!("http://{http}/big")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("larger than the server's limit of 32768 bytes"), "{}", err.message());

    let file = url::Url::from_file_path(dir.join("scene.png")).unwrap().to_string();
    let resp = client.caption(pb::CaptionRequest { image: url_image(file.clone()), ..Default::default() }).await;
    assert_eq!(resp.unwrap().into_inner().key, file);
    let outside = url::Url::from_file_path(std::env::temp_dir()).unwrap().join("../etc/passwd").unwrap().to_string();
    let err = client.caption(pb::CaptionRequest { image: url_image(outside), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn calls_beyond_max_inflight_are_refused_at_once() {
    let http = http_server(Vec::new()).await;
    let addr =
        start_server(engine_args(&["--max-inflight", "1", "--fetch-timeout-s", "20", "--fetch-allow", "127.0.0.1/32"]));
    let ch = channel(addr).await;
    let hang = |ch: tonic::transport::Channel| {
        tokio::spawn(async move {
            let req = pb::GenerateRequest { image: url_image(format!("http://{http}/hang")), params: None };
            GeneratorClient::new(ch).generate(req).await
        })
    };
    // A call that holds the only slot while its image fetch hangs.
    let mut holder = hang(ch.clone());
    let mut client = GeneratorClient::new(ch.clone());
    let scene = draw_scene(&mut StdRng::seed_from_u64(12));
    let start = std::time::Instant::now();
    let refused = loop {
        // Requests are validated before admission, so the probe is a valid, quick one: answered
        // while the slot is free, refused while the holder has it.
        let probe = pb::GenerateRequest {
            image: common::png_image(scene.png()),
            params: Some(pb::GenerationParams { num_candidates: Some(1), max_length: Some(4), ..Default::default() }),
        };
        match client.generate(probe).await {
            Err(e) if e.code() == Code::ResourceExhausted => break e,
            Err(e) => panic!("the probe failed otherwise: {e}"),
            Ok(_) => {}
        }
        if holder.is_finished() {
            // The holder lost the race for the slot to a probe: send it again.
            holder = hang(ch.clone());
        }
        tokio::task::yield_now().await;
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "never refused");
    };
    assert!(refused.message().contains("full"), "{}", refused.message());
    // Worth asking again, and the details say so and which flag set the limit.
    let details = refused.get_error_details();
    let info = details.error_info().expect("an ErrorInfo");
    assert_eq!((info.reason.as_str(), info.metadata["flag"].as_str()), ("SERVER_BUSY", "--max-inflight"));
    assert!(details.retry_info().and_then(|r| r.retry_delay).is_some(), "{details:?}");
    holder.abort();
}
