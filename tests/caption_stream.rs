//! The origin job's numbers and its bulk RPC over real gRPC: Caption's probabilities are the
//! softmax over all N candidates (checked against Rank's softmax over the same N captions,
//! duplicates included), merged or listed per candidate; CaptionStream answers every request by
//! its id in completion order, one failure never ends it, and a stream works on a bounded number
//! of requests at once; open streams are capped process-wide and an idle one ends.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use caption_cascade::pb::{self, cascade_client::CascadeClient, ranker_client::RankerClient};
use common::{png_image, scenes::draw_scene, server, shared_channel};
use prost::Message;
use rand::{rngs::StdRng, SeedableRng};
use tokio_stream::StreamExt;

fn request(png: Vec<u8>, seed: u64, each_candidate: bool, top_k: u32) -> pb::CaptionRequest {
    pb::CaptionRequest {
        image: png_image(png),
        // A high temperature makes the ten candidates a mix of repeats and distinct captions.
        params: Some(pb::GenerationParams {
            num_candidates: Some(10),
            seed: Some(seed),
            temperature: Some(1.6),
            ..Default::default()
        }),
        top_k: Some(top_k),
        each_candidate,
    }
}

#[tokio::test]
async fn caption_probabilities_are_the_softmax_over_all_candidates() {
    let ch = shared_channel().await;
    let mut cascade = CascadeClient::new(ch.clone());
    let mut ranker = RankerClient::new(ch);
    let mut rng = StdRng::seed_from_u64(77);
    let mut saw_duplicates = false;
    for seed in 0..6 {
        let png = draw_scene(&mut rng).png();
        let each = cascade.caption(request(png.clone(), seed, true, 10)).await.unwrap().into_inner();
        let merged = cascade.caption(request(png.clone(), seed, false, 10)).await.unwrap().into_inner();
        assert_eq!(each.candidates, merged.candidates, "same seed, same candidates");
        let candidates = each.candidates.clone();
        // The reference: CLIP's softmax over all N candidates, duplicates included, as the origin
        // computes it.
        let rank = ranker
            .rank(pb::RankRequest { image: png_image(png), captions: candidates.clone() })
            .await
            .unwrap()
            .into_inner();
        let mut reference = vec![0f32; candidates.len()];
        for r in &rank.captions {
            reference[r.index as usize] = r.probability;
        }

        assert_eq!(each.captions.len(), candidates.len(), "one entry per candidate");
        for c in &each.captions {
            assert_eq!(c.text, candidates[c.index as usize]);
            assert_eq!(c.count, 1);
            assert!(
                (c.probability - reference[c.index as usize]).abs() < 1e-5,
                "{c:?} vs {}",
                reference[c.index as usize]
            );
        }
        let total: f32 = merged.captions.iter().map(|c| c.probability).sum();
        assert!((total - 1.0).abs() < 1e-5, "merged probabilities sum to {total}");
        for c in &merged.captions {
            let copies: Vec<usize> = (0..candidates.len()).filter(|&j| candidates[j] == c.text).collect();
            saw_duplicates |= copies.len() > 1;
            assert_eq!(c.count as usize, copies.len());
            let want: f32 = copies.iter().map(|&j| reference[j]).sum();
            assert!((c.probability - want).abs() < 1e-5, "{c:?}: the sum of its copies is {want}");
        }
        assert!(merged.captions.windows(2).all(|w| w[0].probability >= w[1].probability));
        assert!(each.captions.windows(2).all(|w| w[0].probability >= w[1].probability));
    }
    assert!(saw_duplicates, "no scene had a repeated candidate: the merge went untested");
}

fn stream_item(id: &str, request: pb::CaptionRequest) -> pb::CaptionStreamRequest {
    pb::CaptionStreamRequest { id: id.into(), request: Some(request) }
}

#[tokio::test]
async fn a_stream_answers_every_request_by_id_and_goes_on_after_a_failure() {
    let mut client = CascadeClient::new(shared_channel().await);
    let mut rng = StdRng::seed_from_u64(3);
    let (a, b) = (draw_scene(&mut rng).png(), draw_scene(&mut rng).png());
    let items = vec![
        stream_item("a-1", request(a.clone(), 1, false, 3)),
        stream_item("bad", request(b"not an image".to_vec(), 1, false, 3)),
        stream_item("a-2", request(a.clone(), 1, false, 3)),
        stream_item("b", request(b.clone(), 2, true, 2)),
        stream_item("empty", pb::CaptionRequest::default()),
        pb::CaptionStreamRequest { id: "no-request".into(), request: None },
    ];
    let mut answers = client.caption_stream(futures::stream::iter(items)).await.unwrap().into_inner();
    let mut by_id = HashMap::new();
    while let Some(answer) = answers.next().await {
        let answer = answer.expect("the stream itself never fails");
        assert!(by_id.insert(answer.id.clone(), answer).is_none(), "one answer per id");
    }
    assert_eq!(by_id.len(), 6, "{:?}", by_id.keys());
    let ok = |id: &str| match &by_id[id].result {
        Some(pb::caption_stream_response::Result::Response(r)) => r.clone(),
        other => panic!("{id}: {other:?}"),
    };
    let err = |id: &str| match &by_id[id].result {
        Some(pb::caption_stream_response::Result::Error(e)) => e.clone(),
        other => panic!("{id}: {other:?}"),
    };
    // The same image twice: two answers, told apart by id, with the same key and result.
    assert_eq!(ok("a-1").captions, ok("a-2").captions);
    assert!(by_id["a-1"].key.starts_with("sha256:") && by_id["a-1"].key == by_id["a-2"].key);
    assert_eq!(ok("b").captions.len(), 2);
    assert!(ok("b").captions.iter().all(|c| c.count == 1), "each_candidate is honoured per request");
    // The bad image: its status and its key, and the stream went on past it.
    let bad = err("bad");
    assert_eq!(bad.code, tonic::Code::InvalidArgument as i32, "{bad:?}");
    assert!(by_id["bad"].key.starts_with("sha256:"), "a failed image still has its key");
    // With the details a unary call's status carries: what went wrong, for a program to read.
    let info = bad.details.iter().find(|a| a.type_url == "type.googleapis.com/google.rpc.ErrorInfo");
    let info = tonic_types::pb::ErrorInfo::decode(info.expect("an ErrorInfo").value.as_slice()).unwrap();
    assert_eq!((info.reason.as_str(), info.domain.as_str()), ("IMAGE_UNDECODABLE", "caption.v1"));
    assert_eq!(err("empty").code, tonic::Code::InvalidArgument as i32);
    assert_eq!(err("no-request").code, tonic::Code::InvalidArgument as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_works_on_a_bounded_number_of_requests_at_once() {
    let server = server(&["--max-stream-inflight", "2"]).metrics().start().await;
    let metrics = server.metrics();
    let mut client = CascadeClient::new(common::channel(server.addr()).await);
    let mut rng = StdRng::seed_from_u64(9);
    let items: Vec<_> = (0..12)
        .map(|i| {
            let mut r = request(draw_scene(&mut rng).png(), i, false, 1);
            r.params.as_mut().unwrap().max_length = Some(30);
            stream_item(&i.to_string(), r)
        })
        .collect();
    let answers = tokio::spawn(async move {
        let mut answers = client.caption_stream(futures::stream::iter(items)).await.unwrap().into_inner();
        let mut n = 0;
        while let Some(a) = answers.next().await {
            assert!(matches!(a.unwrap().result, Some(pb::caption_stream_response::Result::Response(_))));
            n += 1;
        }
        n
    });
    let (mut peak, start) = (0.0f64, Instant::now());
    while !answers.is_finished() {
        let text = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap().text().await.unwrap();
        let inflight = text
            .lines()
            .find(|l| l.starts_with(r#"caption_inflight_requests{service="CaptionStream"}"#))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        peak = peak.max(inflight);
        assert!(start.elapsed() < Duration::from_secs(120), "the stream never finished");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(answers.await.unwrap(), 12, "every request answered");
    drop(server);
    assert_eq!(peak, 2.0, "at most --max-stream-inflight at once, and that many in use");
}

/// Open streams are bounded process-wide, and one with nothing in flight ends once idle for
/// `--stream-idle-timeout-s`, while one waiting on its requests' answers does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_capped_and_idle_ones_end() {
    let http = common::http::http_server(Vec::new()).await;
    let args = ["--max-open-streams", "2", "--stream-idle-timeout-s", "1", "--fetch-timeout-s", "3"];
    let server = server(&args).args(&["--fetch-allow", "127.0.0.1/32"]).metrics().start().await;
    let ch = common::channel(server.addr()).await;
    let open = |items: Vec<pb::CaptionStreamRequest>| {
        let mut client = CascadeClient::new(ch.clone());
        async move {
            // Sends `items`, then keeps the request side open.
            let outbound = futures::stream::iter(items).chain(futures::stream::pending());
            client.caption_stream(outbound).await
        }
    };
    let open_gauge = || async {
        let text = reqwest::get(format!("http://{}/metrics", server.metrics())).await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix("caption_open_streams ")?.parse::<f64>().ok()).unwrap_or(0.0)
    };

    // One stream waits 3 s on an image that never comes; the other sends nothing.
    let hang = pb::CaptionRequest {
        image: Some(pb::Image { source: Some(pb::image::Source::Url(format!("http://{http}/hang"))) }),
        ..Default::default()
    };
    let start = Instant::now();
    let mut busy = open(vec![stream_item("hang", hang)]).await.unwrap().into_inner();
    let mut idle = open(Vec::new()).await.unwrap().into_inner();
    assert_eq!(open_gauge().await, 2.0);
    let refused = open(Vec::new()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-open-streams"), "{}", refused.message());

    let ended = idle.message().await.unwrap_err();
    assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    assert!(ended.message().contains("--stream-idle-timeout"), "{}", ended.message());
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
    // Its place is free again.
    let mut again = open(Vec::new()).await.unwrap().into_inner();

    // The busy stream outlives the idle timeout while its item is in flight, answers it, and
    // only then, idle, ends.
    let answer = busy.message().await.unwrap().expect("the item is answered");
    assert_eq!(answer.id, "hang");
    assert!(start.elapsed() >= Duration::from_secs(3), "answered when the fetch timed out");
    assert!(matches!(answer.result, Some(pb::caption_stream_response::Result::Error(_))), "{answer:?}");
    assert_eq!(busy.message().await.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    assert_eq!(again.message().await.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    // A stream's place is given back just after its last message: poll.
    let start = Instant::now();
    while open_gauge().await != 0.0 {
        assert!(start.elapsed() < Duration::from_secs(5), "a place was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
