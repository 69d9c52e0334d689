//! The result cache of Cascade.Caption over real gRPC on loopback, with servers started as the
//! binary (`serve --result-cache-bytes …`) and images served by an origin on 127.0.0.1 that this
//! test runs and changes: a deterministic request is answered from the cache (no decode step, the
//! origin asked with a conditional GET answered 304), a changed image is computed from its new
//! bytes (the captions are the scenes' true ones, never the stale answer), Last-Modified-only and
//! validator-less origins, unseeded sampling bypasses the cache, inline bytes hit by digest and
//! any other parameter misses, CaptionStream items (identical ones computed once), the time to
//! live, the byte bound, off by default, and the split topology's cascade tier.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use caption_cascade::pb::{self, cascade_client::CascadeClient};
use common::{channel, png_image, server, ServerProcess};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tonic::transport::Channel;

fn scene(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/examples/images/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The true caption of an example scene (what the shipped models answer).
fn expected(name: &str) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/images/expected.json")).unwrap();
    let all: HashMap<String, String> = serde_json::from_str(&text).unwrap();
    all[name].clone()
}

/// One request as the origin saw it, and how it answered.
#[derive(Debug, Clone)]
struct Seen {
    if_none_match: Option<String>,
    if_modified_since: Option<String>,
    status: u16,
}

struct Served {
    body: Vec<u8>,
    etag: Option<String>,
    last_modified: Option<String>,
    seen: Vec<Seen>,
}

/// An HTTP origin on loopback serving one image at `/image.png`, with the validators the test
/// sets (an ETag, a Last-Modified, or none). It answers a matching `If-None-Match`, or failing
/// that a matching `If-Modified-Since`, with 304, and keeps what every request asked.
struct Origin {
    addr: SocketAddr,
    served: Arc<Mutex<Served>>,
}

impl Origin {
    async fn start(body: Vec<u8>, etag: Option<&str>, last_modified: Option<&str>) -> Self {
        let served = Arc::new(Mutex::new(Served {
            body,
            etag: etag.map(String::from),
            last_modified: last_modified.map(String::from),
            seen: Vec::new(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = served.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let header = |name: &str| {
                        text.lines().find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                    };
                    let (inm, ims) = (header("if-none-match"), header("if-modified-since"));
                    let reply = {
                        let mut s = state.lock().unwrap();
                        // RFC 9110 §13.2.2: If-None-Match first; If-Modified-Since only without it.
                        let not_modified = match (&inm, &ims) {
                            (Some(tag), _) => s.etag.as_ref() == Some(tag),
                            (None, Some(since)) => s.last_modified.as_ref().is_some_and(|lm| {
                                let (Ok(since), Ok(lm)) =
                                    (httpdate::parse_http_date(since), httpdate::parse_http_date(lm))
                                else {
                                    return false;
                                };
                                lm <= since
                            }),
                            (None, None) => false,
                        };
                        let mut head = format!(
                            "HTTP/1.1 {}\r\nDate: {}\r\nConnection: close\r\n",
                            if not_modified { "304 Not Modified" } else { "200 OK" },
                            httpdate::fmt_http_date(SystemTime::now())
                        );
                        if let Some(etag) = &s.etag {
                            head.push_str(&format!("ETag: {etag}\r\n"));
                        }
                        if let Some(lm) = &s.last_modified {
                            head.push_str(&format!("Last-Modified: {lm}\r\n"));
                        }
                        let body = if not_modified { Vec::new() } else { s.body.clone() };
                        if !not_modified {
                            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                        }
                        head.push_str("\r\n");
                        let status = if not_modified { 304 } else { 200 };
                        s.seen.push(Seen { if_none_match: inm, if_modified_since: ims, status });
                        [head.into_bytes(), body].concat()
                    };
                    let _ = sock.write_all(&reply).await;
                });
            }
        });
        Self { addr, served }
    }

    fn url(&self) -> String {
        format!("http://{}/image.png", self.addr)
    }

    /// Serves other bytes with other validators from now on.
    fn change(&self, body: Vec<u8>, etag: Option<&str>, last_modified: Option<&str>) {
        let mut s = self.served.lock().unwrap();
        s.body = body;
        s.etag = etag.map(String::from);
        s.last_modified = last_modified.map(String::from);
    }

    fn seen(&self) -> Vec<Seen> {
        self.served.lock().unwrap().seen.clone()
    }
}

/// A `serve` process with both models, allowed to fetch from loopback, its metrics on a port
/// of its own.
struct Server {
    _process: ServerProcess,
    metrics: SocketAddr,
    channel: Channel,
}

impl Server {
    async fn start(args: &[&str]) -> Self {
        let process = server(&["--fetch-allow", "127.0.0.1/32"]).args(args).metrics().start().await;
        let channel = channel(process.addr()).await;
        Self { metrics: process.metrics(), channel, _process: process }
    }

    fn client(&self) -> CascadeClient<Channel> {
        CascadeClient::new(self.channel.clone())
    }

    async fn caption(&self, request: pb::CaptionRequest) -> pb::CaptionResponse {
        self.client().caption(request).await.expect("caption").into_inner()
    }

    async fn metric(&self, name: &str) -> f64 {
        metric(self.metrics, name).await
    }
}

/// The sum of a metric's samples whose name and labels start with `name`; 0 when absent (a
/// counter never incremented is not exported).
async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{', ',']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const HITS: &str = "caption_result_cache_hits_total";
const MISSES: &str = "caption_result_cache_misses_total";
const BYPASSED: &str = "caption_result_cache_bypassed_total";
const DECODE_STEPS: &str = "caption_decode_steps_total";

fn revalidations(outcome: &str) -> String {
    format!("caption_result_cache_revalidations_total{{outcome=\"{outcome}\"}}")
}

fn url_image(url: String) -> Option<pb::Image> {
    Some(pb::Image { source: Some(pb::image::Source::Url(url)) })
}

fn request(image: Option<pb::Image>, params: pb::GenerationParams, top_k: u32) -> pb::CaptionRequest {
    pb::CaptionRequest { image, params: Some(params), top_k: Some(top_k), ..Default::default() }
}

fn seeded(seed: u64) -> pb::GenerationParams {
    pb::GenerationParams { num_candidates: Some(6), seed: Some(seed), ..Default::default() }
}

fn greedy() -> pb::GenerationParams {
    pb::GenerationParams { num_candidates: Some(2), decoding: pb::Decoding::Greedy as i32, ..Default::default() }
}

fn top(response: &pb::CaptionResponse) -> &str {
    &response.captions[0].text
}

const CACHE: [&str; 2] = ["--result-cache-bytes", "1000000"];

#[tokio::test]
async fn a_seeded_request_by_url_is_answered_from_the_cache_after_a_304() {
    let origin = Origin::start(scene("scene_1.png"), Some("\"one\""), None).await;
    let server = Server::start(&CACHE).await;
    let first = server.caption(request(url_image(origin.url()), seeded(42), 3)).await;
    let steps = server.metric(DECODE_STEPS).await;
    assert!(steps > 0.0);
    let again = server.caption(request(url_image(origin.url()), seeded(42), 3)).await;

    assert_eq!(again.key, origin.url(), "the request's own correlation key");
    assert_eq!(again.captions, first.captions, "the same captions and probabilities");
    assert_eq!(again.candidates, first.candidates);
    assert_eq!(first.candidates.len(), 6);
    // Nothing was computed for the second call, and its timings say so.
    assert_eq!(server.metric(DECODE_STEPS).await, steps, "a cached answer runs no decode step");
    let (t1, t2) = (first.timings.unwrap(), again.timings.unwrap());
    assert!(t1.generate_ms > 0.0 && t1.rank_ms > 0.0, "{t1:?}");
    assert_eq!((t2.preprocess_ms, t2.generate_ms, t2.rank_ms), (0.0, 0.0, 0.0), "{t2:?}");
    assert!(t2.fetch_ms > 0.0 && t2.total_ms >= t2.fetch_ms, "the revalidation's time: {t2:?}");

    // The origin was asked whether its image changed, and said it did not.
    let seen = origin.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].if_none_match.as_deref(), seen[0].status), (None, 200));
    assert_eq!((seen[1].if_none_match.as_deref(), seen[1].status), (Some("\"one\""), 304));
    assert_eq!(server.metric(HITS).await, 1.0);
    assert_eq!(server.metric(MISSES).await, 1.0);
    assert_eq!(server.metric(&revalidations("no_validator")).await, 1.0);
    assert_eq!(server.metric(&revalidations("not_modified")).await, 1.0);
    assert_eq!(server.metric("caption_result_cache_entries").await, 1.0);
    assert!(server.metric("caption_result_cache_bytes").await > 0.0);
}

#[tokio::test]
async fn a_changed_image_is_computed_from_its_new_bytes_never_answered_stale() {
    let origin = Origin::start(scene("scene_1.png"), Some("\"one\""), None).await;
    let server = Server::start(&CACHE).await;
    let url = origin.url();
    // An unseeded call first: it bypasses the result cache and leaves scene 1's pixels in the
    // image cache under the URL, which a cacheable call must never use once the image changed.
    let unseeded = pb::GenerationParams { num_candidates: Some(2), ..Default::default() };
    server.caption(request(url_image(url.clone()), unseeded, 1)).await;
    let before = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(top(&before), expected("scene_1.png"));
    assert_eq!(top(&server.caption(request(url_image(url.clone()), greedy(), 1)).await), expected("scene_1.png"));
    assert_eq!(server.metric(HITS).await, 1.0);

    origin.change(scene("scene_3.png"), Some("\"three\""), None);
    let after = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(top(&after), expected("scene_3.png"), "computed from the new image");
    assert_ne!(expected("scene_1.png"), expected("scene_3.png"));
    assert_eq!(after.key, url);
    let seen = origin.seen();
    let last = seen.last().unwrap();
    assert_eq!((last.if_none_match.as_deref(), last.status), (Some("\"one\""), 200), "{seen:?}");
    assert_eq!(server.metric(&revalidations("changed")).await, 1.0);
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 2.0));

    // The new answer is kept and revalidated against the new ETag.
    let cached = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(top(&cached), expected("scene_3.png"));
    let last = origin.seen().last().unwrap().clone();
    assert_eq!((last.if_none_match.as_deref(), last.status), (Some("\"three\""), 304));
    assert_eq!(server.metric(HITS).await, 2.0);
}

#[tokio::test]
async fn an_origin_with_only_last_modified_is_revalidated_with_if_modified_since() {
    let (monday, tuesday) = ("Mon, 01 Jan 2024 00:00:00 GMT", "Tue, 02 Jan 2024 00:00:00 GMT");
    let origin = Origin::start(scene("scene_2.png"), None, Some(monday)).await;
    let server = Server::start(&CACHE).await;
    let url = origin.url();
    let first = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(top(&first), expected("scene_2.png"));
    let again = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(again.captions, first.captions);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[1].if_modified_since.as_deref(), seen[1].if_none_match.as_deref()), (Some(monday), None));
    assert_eq!(seen[1].status, 304);
    assert_eq!(server.metric(HITS).await, 1.0);

    origin.change(scene("scene_5.png"), None, Some(tuesday));
    let changed = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(top(&changed), expected("scene_5.png"));
    let last = origin.seen().last().unwrap().clone();
    assert_eq!((last.if_modified_since.as_deref(), last.status), (Some(monday), 200));
    assert_eq!(server.metric(&revalidations("changed")).await, 1.0);
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 2.0));
}

#[tokio::test]
async fn an_origin_without_validators_is_fetched_every_time_and_keyed_by_content() {
    let origin = Origin::start(scene("scene_2.png"), None, None).await;
    let server = Server::start(&CACHE).await;
    let url = origin.url();
    let first = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    let steps = server.metric(DECODE_STEPS).await;
    let again = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!((top(&first), again.captions == first.captions), (expected("scene_2.png").as_str(), true));
    assert_eq!(server.metric(DECODE_STEPS).await, steps, "the same bytes: answered from the cache");
    let seen = origin.seen();
    assert_eq!(seen.len(), 2, "fetched in full each time");
    assert!(seen.iter().all(|s| s.if_none_match.is_none() && s.if_modified_since.is_none() && s.status == 200));
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 1.0));

    origin.change(scene("scene_4.png"), None, None);
    let changed = server.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(top(&changed), expected("scene_4.png"), "other bytes: computed again");
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 2.0));
    assert_eq!(server.metric(&revalidations("no_validator")).await, 3.0);
    assert_eq!(server.metric(&revalidations("not_modified")).await, 0.0);
}

#[tokio::test]
async fn unseeded_sampling_is_never_cached() {
    let server = Server::start(&CACHE).await;
    let image = png_image(scene("scene_6.png"));
    let unseeded = pb::GenerationParams { num_candidates: Some(4), ..Default::default() };
    let notebook = pb::GenerationParams {
        num_candidates: Some(2),
        preset: pb::Preset::Notebook as i32,
        max_length: Some(20),
        ..Default::default()
    };
    let mut steps = server.metric(DECODE_STEPS).await;
    for params in [unseeded.clone(), unseeded, notebook.clone(), notebook] {
        server.caption(request(image.clone(), params, 3)).await;
        let now = server.metric(DECODE_STEPS).await;
        assert!(now > steps, "computed every time");
        steps = now;
    }
    assert_eq!(server.metric(BYPASSED).await, 4.0);
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (0.0, 0.0));
    assert_eq!(server.metric("caption_result_cache_entries").await, 0.0);
}

#[tokio::test]
async fn inline_bytes_hit_by_digest_and_any_other_parameter_misses() {
    let server = Server::start(&CACHE).await;
    let bytes = scene("scene_7.png");
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let inline = || png_image(bytes.clone());
    let first = server.caption(request(inline(), seeded(7), 3)).await;
    let again = server.caption(request(inline(), seeded(7), 3)).await;
    assert_eq!(again.key, format!("sha256:{digest}"));
    assert_eq!((again.captions == first.captions, again.candidates == first.candidates), (true, true));
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 1.0));

    // Each of these changes the answer, so each is computed.
    let each = pb::CaptionRequest { each_candidate: true, ..request(inline(), seeded(7), 3) };
    let prompted = pb::GenerationParams { prompt: Some("a picture of".into()), ..seeded(7) };
    let others = [
        request(inline(), seeded(7), 2),
        request(inline(), seeded(8), 3),
        each,
        request(inline(), prompted, 3),
        request(inline(), pb::GenerationParams { top_k: Some(5), ..seeded(7) }, 3),
    ];
    for (i, other) in others.into_iter().enumerate() {
        let steps = server.metric(DECODE_STEPS).await;
        server.caption(other).await;
        assert!(server.metric(DECODE_STEPS).await > steps, "request {i} was not computed");
    }
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 6.0));
    let fewer = server.caption(request(inline(), seeded(7), 2)).await;
    assert_eq!(fewer.captions.len(), 2.min(first.captions.len()));
    assert_eq!(server.metric(HITS).await, 2.0, "top_k 2 was kept as its own answer");

    // The same bytes by URL: keyed by content, answered from the inline call's answer, under
    // the URL as its key.
    let origin = Origin::start(bytes.clone(), None, None).await;
    let by_url = server.caption(request(url_image(origin.url()), seeded(7), 3)).await;
    assert_eq!((by_url.key, by_url.captions), (origin.url(), first.captions));
    assert_eq!(server.metric(HITS).await, 3.0);
}

#[tokio::test]
async fn answers_older_than_the_ttl_are_computed_again() {
    let server = Server::start(&["--result-cache-bytes", "1000000", "--result-cache-ttl-s", "1"]).await;
    let image = png_image(scene("scene_8.png"));
    let first = server.caption(request(image.clone(), greedy(), 1)).await;
    assert_eq!(top(&first), expected("scene_8.png"));
    server.caption(request(image.clone(), greedy(), 1)).await;
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 1.0));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let steps = server.metric(DECODE_STEPS).await;
    let later = server.caption(request(image.clone(), greedy(), 1)).await;
    assert_eq!(later.captions, first.captions);
    assert!(server.metric(DECODE_STEPS).await > steps, "the expired answer was computed again");
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 2.0));
}

#[tokio::test]
async fn the_byte_bound_evicts_the_least_recently_used_answers() {
    // A greedy answer of 2 candidates takes a few hundred bytes: a handful fit, not five.
    let bound = 1500.0;
    let server = Server::start(&["--result-cache-bytes", "1500"]).await;
    let names = ["scene_1.png", "scene_3.png", "scene_4.png", "scene_5.png", "scene_6.png"];
    for name in names {
        server.caption(request(png_image(scene(name)), greedy(), 1)).await;
        assert!(server.metric("caption_result_cache_bytes").await <= bound);
    }
    let entries = server.metric("caption_result_cache_entries").await;
    let bytes = server.metric("caption_result_cache_bytes").await;
    assert!((1.0..5.0).contains(&entries), "{entries} answers kept");
    assert!(bytes > 0.0 && bytes <= bound && bytes / entries > bound / 5.0, "{bytes} bytes in {entries} answers");
    assert_eq!(server.metric(MISSES).await, 5.0);
    // The latest is kept (and now the most recently used), the first was evicted.
    server.caption(request(png_image(scene(names[4])), greedy(), 1)).await;
    assert_eq!(server.metric(HITS).await, 1.0);
    let first = server.caption(request(png_image(scene(names[0])), greedy(), 1)).await;
    assert_eq!(top(&first), expected(names[0]));
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (1.0, 6.0));
    server.caption(request(png_image(scene(names[4])), greedy(), 1)).await;
    assert_eq!(server.metric(HITS).await, 2.0, "the most recently used outlived the eviction");
}

#[tokio::test]
async fn the_cache_is_off_by_default() {
    let origin = Origin::start(scene("scene_1.png"), Some("\"one\""), None).await;
    let server = Server::start(&[]).await;
    for image in [url_image(origin.url()), png_image(scene("scene_1.png"))] {
        for _ in 0..2 {
            let steps = server.metric(DECODE_STEPS).await;
            server.caption(request(image.clone(), seeded(42), 3)).await;
            assert!(server.metric(DECODE_STEPS).await > steps, "computed every time");
        }
    }
    assert!(origin.seen().iter().all(|s| s.if_none_match.is_none()), "no conditional request");
    for name in [HITS, MISSES, BYPASSED, "caption_result_cache_revalidations_total"] {
        assert_eq!(server.metric(name).await, 0.0, "{name}");
    }
}

/// The split topology: a generator, a ranker and a cascade tier with the result cache, each a
/// process of its own. The cascade answers a repeated request without calling the generator,
/// and a changed image by calling it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_split_cascade_tier_answers_from_the_cache_and_revalidates() {
    let origin = Origin::start(scene("scene_1.png"), Some("\"one\""), None).await;
    let (g, r) = (server(&["--services", "generator"]).metrics().spawn(), server(&["--services", "ranker"]).spawn());
    let (g, r) = (g.ready().await, r.ready().await);
    let g_metrics = g.metrics();
    let (generator, ranker) = (format!("http://{}", g.addr()), format!("http://{}", r.addr()));
    let cascade = Server::start(&[
        "--services",
        "cascade",
        "--generator-endpoint",
        &generator,
        "--ranker-endpoint",
        &ranker,
        "--upstream-check-interval-ms",
        "200",
        "--result-cache-bytes",
        "1000000",
    ])
    .await;
    let generated = || metric(g_metrics, "caption_requests_total{service=\"Generate\",code=\"OK\"}");
    let url = origin.url();
    let first = cascade.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(top(&first), expected("scene_1.png"));
    assert_eq!(generated().await, 1.0);
    let again = cascade.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!((again.key.as_str(), &again.captions), (url.as_str(), &first.captions));
    assert_eq!(generated().await, 1.0, "answered without calling the generator");
    assert_eq!(origin.seen().last().unwrap().status, 304);
    assert_eq!(cascade.metric(HITS).await, 1.0);

    origin.change(scene("scene_3.png"), Some("\"three\""), None);
    let changed = cascade.caption(request(url_image(url.clone()), greedy(), 1)).await;
    assert_eq!(top(&changed), expected("scene_3.png"));
    assert_eq!(generated().await, 2.0);
    // Unseeded sampling goes to the generator every time.
    let unseeded = pb::GenerationParams { num_candidates: Some(2), ..Default::default() };
    for _ in 0..2 {
        cascade.caption(request(png_image(scene("scene_3.png")), unseeded.clone(), 1)).await;
    }
    assert_eq!(generated().await, 4.0);
    assert_eq!(cascade.metric(BYPASSED).await, 2.0);
    assert_eq!((cascade.metric(HITS).await, cascade.metric(MISSES).await), (1.0, 2.0));
}

/// CaptionStream's items go through the same cache: identical items are computed once (joined
/// while computing, or answered from the cache after), each answered under its own id.
#[tokio::test]
async fn caption_stream_items_share_the_cache_and_identical_ones_compute_once() {
    use tokio_stream::StreamExt;
    let server = Server::start(&CACHE).await;
    let image = png_image(scene("scene_4.png"));
    let item =
        |id: &str| pb::CaptionStreamRequest { id: id.into(), request: Some(request(image.clone(), seeded(11), 3)) };
    let items = vec![item("a"), item("b"), item("c")];
    let mut answers = server.client().caption_stream(futures::stream::iter(items)).await.unwrap().into_inner();
    let mut by_id = HashMap::new();
    while let Some(answer) = answers.next().await {
        let answer = answer.unwrap();
        match answer.result {
            Some(pb::caption_stream_response::Result::Response(r)) => by_id.insert(answer.id, r),
            other => panic!("{}: {other:?}", answer.id),
        };
    }
    assert_eq!(by_id.len(), 3);
    assert!(by_id.values().all(|r| r.captions == by_id["a"].captions && r.key.starts_with("sha256:")));
    assert_eq!((server.metric(HITS).await, server.metric(MISSES).await), (2.0, 1.0));
    // And a unary call after the stream is answered from what the stream computed.
    let unary = server.caption(request(image.clone(), seeded(11), 3)).await;
    assert_eq!(unary.captions, by_id["a"].captions);
    assert_eq!(server.metric(HITS).await, 3.0);
}
