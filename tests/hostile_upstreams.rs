//! A cascade tier over hostile upstreams: an in-test generator and ranker that answer whatever a
//! case asks for (60 MB, a thousand candidates, a 3 MB caption, NaN and infinite scores, indices
//! repeated, missing or out of range, no answer at all). Each bad answer fails the call with
//! INTERNAL naming the upstream and what was wrong, is asked once (never retried), is counted,
//! and is never cached; an upstream that never answers costs a caller without a deadline
//! `--upstream-timeout`, not forever.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use caption_cascade::pb::{
    self,
    cascade_client::CascadeClient,
    generator_server::{Generator, GeneratorServer},
    ranker_server::{Ranker, RankerServer},
};
use common::{png_image, ServerProcess};
use tonic::{Code, Request, Response, Status};

/// How long the cascade under test gives an upstream call (`--upstream-timeout`).
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(400);

/// What the fake upstreams answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Honest,
    /// 60 candidates of 1 MB each.
    Oversize,
    TooManyCandidates,
    /// One candidate of 3 MB.
    HugeCaption,
    /// One candidate a byte over the cascade's --max-caption-bytes (1024), within the size bound.
    LongCaption,
    NoCandidates,
    /// Every caption's logit is this.
    Logit(f32),
    DuplicateIndex,
    MissingIndex,
    IndexOutOfRange,
    /// Generate never answers.
    Hang,
}

/// A generator and a ranker in one, answering as `mode` says, counting the calls it gets.
struct Fake {
    mode: Mutex<Mode>,
    generates: AtomicUsize,
    ranks: AtomicUsize,
}

impl Fake {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

fn candidates(texts: impl IntoIterator<Item = String>) -> Vec<pb::Candidate> {
    texts.into_iter().map(|text| pb::Candidate { text, token_ids: vec![1, 2, 3] }).collect()
}

#[tonic::async_trait]
impl Generator for Fake {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        self.generates.fetch_add(1, Ordering::SeqCst);
        let asked = request.into_inner().params.and_then(|p| p.num_candidates).unwrap_or(10) as usize;
        let honest = ["a red circle", "a blue square", "a red circle", "a green triangle"];
        let texts: Vec<String> = match self.mode() {
            Mode::Oversize => vec!["x".repeat(1 << 20); 60],
            Mode::TooManyCandidates => vec!["a dot".into(); 1000],
            Mode::HugeCaption => vec!["x".repeat(3 << 20)],
            Mode::LongCaption => vec!["x".repeat(1025)],
            Mode::NoCandidates => vec![],
            Mode::Hang => std::future::pending().await,
            _ => honest.iter().cycle().take(asked).map(|s| s.to_string()).collect(),
        };
        Ok(Response::new(pb::GenerateResponse {
            key: "sha256:fake".into(),
            candidates: candidates(texts),
            timings: None,
        }))
    }
}

#[tonic::async_trait]
impl Ranker for Fake {
    async fn rank(&self, request: Request<pb::RankRequest>) -> Result<Response<pb::RankResponse>, Status> {
        self.ranks.fetch_add(1, Ordering::SeqCst);
        let n = request.get_ref().captions.len() as u32;
        let (logit, indices): (Option<f32>, Vec<u32>) = match self.mode() {
            Mode::Logit(x) => (Some(x), (0..n).collect()),
            Mode::DuplicateIndex => (None, [0].into_iter().chain(0..n - 1).collect()),
            Mode::MissingIndex => (None, (1..n).collect()),
            Mode::IndexOutOfRange => (None, (0..n).chain([99]).collect()),
            _ => (None, (0..n).rev().collect()),
        };
        let captions = indices
            .into_iter()
            .map(|index| pb::RankedCaption {
                text: String::new(),
                probability: 1.0 / n as f32,
                cosine: 0.25,
                logit: logit.unwrap_or(20.0 + index as f32),
                index,
                count: 0,
            })
            .collect();
        Ok(Response::new(pb::RankResponse { key: "sha256:fake".into(), captions, timings: None }))
    }
}

/// Serves the fake as caption.v1.Generator and caption.v1.Ranker, both SERVING, on a port of
/// its own.
async fn start_fake() -> (Arc<Fake>, SocketAddr) {
    let fake = Arc::new(Fake { mode: Mutex::new(Mode::Honest), generates: 0.into(), ranks: 0.into() });
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GeneratorServer<Fake>>().await;
    health.set_serving::<RankerServer<Fake>>().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(GeneratorServer::from_arc(fake.clone()))
        .add_service(RankerServer::from_arc(fake.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    (fake, addr)
}

async fn metric(process: &ServerProcess, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", process.metrics())).await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// The most memory the process has held at once, in bytes.
fn peak_rss(process: &ServerProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.id())).unwrap();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

fn request(seed: Option<u64>) -> pb::CaptionRequest {
    pb::CaptionRequest {
        image: png_image(vec![0x89, b'P', b'N', b'G']),
        params: Some(pb::GenerationParams { num_candidates: Some(4), seed, ..Default::default() }),
        top_k: Some(3),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upstream_answers_fail_the_call_clearly_once_and_are_never_cached() {
    let (fake, upstream) = start_fake().await;
    let endpoint = format!("http://{upstream}");
    let timeout_ms = UPSTREAM_TIMEOUT.as_millis().to_string();
    let cascade = common::server(&[
        "--services",
        "cascade",
        "--generator-endpoint",
        &endpoint,
        "--ranker-endpoint",
        &endpoint,
        "--upstream-check-interval-ms",
        "100",
        "--upstream-timeout-ms",
        &timeout_ms,
        "--result-cache-bytes",
        "1000000",
    ])
    .metrics()
    .start()
    .await;
    let mut client = CascadeClient::new(common::channel(cascade.addr()).await);

    let honest = client.caption(request(None)).await.unwrap().into_inner();
    assert_eq!(honest.candidates.len(), 4);
    assert_eq!(honest.captions[0].text, "a green triangle");
    assert!(honest.captions.iter().all(|c| c.probability.is_finite() && c.probability > 0.0), "{honest:?}");

    let generate = "the Generate upstream's answer is invalid: ";
    let rank = "the Rank upstream's answer is invalid: ";
    let too_large = "larger than this tier's request limits allow: Error, decoded message length too large";
    let cases: [(Mode, String, &str); 11] = [
        (Mode::Oversize, format!("{generate}{too_large}"), "Generate\",reason=\"too_large"),
        (Mode::HugeCaption, format!("{generate}{too_large}"), "Generate\",reason=\"too_large"),
        (
            Mode::TooManyCandidates,
            format!("{generate}1000 candidates, more than the 4 asked for"),
            "Generate\",reason=\"too_many_candidates",
        ),
        (
            Mode::LongCaption,
            format!("{generate}candidate 0 is 1025 bytes, over --max-caption-bytes 1024"),
            "Generate\",reason=\"caption_too_long",
        ),
        (Mode::NoCandidates, format!("{generate}no candidates"), "Generate\",reason=\"no_candidates"),
        (Mode::Logit(f32::NAN), format!("{rank}caption 0 has logit NaN"), "Rank\",reason=\"non_finite_score"),
        (Mode::Logit(f32::INFINITY), format!("{rank}caption 0 has logit inf"), "Rank\",reason=\"non_finite_score"),
        (Mode::Logit(f32::NEG_INFINITY), format!("{rank}caption 0 has logit -inf"), "Rank\",reason=\"non_finite_score"),
        (Mode::DuplicateIndex, format!("{rank}caption 0 is scored twice"), "Rank\",reason=\"duplicate_index"),
        (
            Mode::MissingIndex,
            format!("{rank}2 of 3 captions scored; caption 0 is missing"),
            "Rank\",reason=\"missing_index",
        ),
        (
            Mode::IndexOutOfRange,
            format!("{rank}index 99, but 3 captions were sent"),
            "Rank\",reason=\"index_out_of_range",
        ),
    ];
    // Every case is tried and what went wrong in each is told at the end.
    let mut wrong = Vec::new();
    for (mode, message, series) in cases {
        fake.set(mode);
        let (generates, ranks) = (fake.generates.load(Ordering::SeqCst), fake.ranks.load(Ordering::SeqCst));
        let series = format!("caption_upstream_invalid_answers_total{{service=\"{series}\"}}");
        let counted = metric(&cascade, &series).await;
        let peak = peak_rss(&cascade);
        match client.caption(request(None)).await {
            Ok(answer) => wrong.push(format!("{mode:?}: answered {:?}", answer.get_ref().captions.first())),
            // The size refusal ends with tonic's numbers; every other message is whole.
            Err(e) if e.code() != Code::Internal || !e.message().starts_with(&message) => {
                wrong.push(format!("{mode:?}: {:?} {:?}, not INTERNAL {message:?}", e.code(), e.message()))
            }
            Err(_) => {}
        }
        // Asked once: a broken answer is not retried.
        let rank_asked = !series.contains("Generate");
        let asked = (fake.generates.load(Ordering::SeqCst) - generates, fake.ranks.load(Ordering::SeqCst) - ranks);
        if asked != (1, rank_asked as usize) {
            wrong.push(format!("{mode:?}: (Generate, Rank) asked {asked:?} times"));
        }
        if metric(&cascade, &series).await != counted + 1.0 {
            wrong.push(format!("{mode:?}: {series} did not count it"));
        }
        // An answer over the bound is refused from its length prefix, never read whole.
        let grown = peak_rss(&cascade).saturating_sub(peak);
        if grown >= 20 << 20 {
            wrong.push(format!("{mode:?}: the cascade's peak memory grew by {grown} bytes"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // An upstream that never answers a caller without a deadline costs --upstream-timeout.
    fake.set(Mode::Hang);
    let start = Instant::now();
    let err = client.caption(request(None)).await.unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        err.message(),
        format!("the Generate upstream did not answer within --upstream-timeout ({timeout_ms} ms)")
    );
    assert!(waited >= UPSTREAM_TIMEOUT && waited < UPSTREAM_TIMEOUT + Duration::from_secs(2), "{waited:?}");

    // A NaN answer is not kept: the same deterministic request, once the ranker is fixed, is
    // computed and correct; asked again, it comes from the cache.
    fake.set(Mode::Logit(f32::NAN));
    let err = client.caption(request(Some(7))).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    fake.set(Mode::Honest);
    let ranks = fake.ranks.load(Ordering::SeqCst);
    let fixed = client.caption(request(Some(7))).await.unwrap().into_inner();
    assert_eq!(fake.ranks.load(Ordering::SeqCst), ranks + 1, "the fixed call was answered from the cache");
    assert!(fixed.captions.iter().all(|c| c.probability.is_finite() && c.probability > 0.0), "{fixed:?}");
    let again = client.caption(request(Some(7))).await.unwrap().into_inner();
    assert_eq!(fake.ranks.load(Ordering::SeqCst), ranks + 1, "the result cache is on");
    assert_eq!(again.captions, fixed.captions);
}
