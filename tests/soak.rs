//! A soak of every trust boundary at once, against the split topology on loopback: two generators
//! and two rankers behind one cascade tier that wants a bearer token, caps open CaptionStreams and
//! ends idle ones. Normal callers (Caption and CaptionStream; fresh scenes, seeded scenes checked
//! against the answers given before any chaos, images by URL from a loopback origin), hostile
//! callers (no token or a wrong one, undecodable images, odd parameters, a message over the limit,
//! strings that are not UTF-8, URLs with credentials or control characters, idle streams, streams
//! beyond the cap, a stream with a malformed item) and a chaos loop that kills and restarts, or
//! stops and continues, one replica at a time. Every call must get a code its case allows, every
//! unary call must return, every stream item must be answered, and each process's RSS must stay
//! under its bound. Also: what an open CaptionStream costs in memory. Both are `#[ignore]`d;
//! `make soak` runs the soak.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use caption_cascade::{
    images::SMALL_IMAGE_PIXELS,
    pb::{self, cascade_client::CascadeClient},
};
use common::{
    png_image,
    raw::{field, Raw},
    scenes::draw_scene,
    ServerProcess,
};
use futures::StreamExt;
use prost::Message;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{transport::Channel, Code, Status};

// The cascade tier's flags that the checks below depend on.
const MAX_OPEN_STREAMS: usize = 16;
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
const STREAM_INFLIGHT: usize = 4;
const UPSTREAM_TIMEOUT_MS: u64 = 6000;
const CASCADE_MESSAGE_BYTES: u64 = 4 << 20;
const CASCADE_IMAGE_CACHE: u64 = 1 << 20;
// The model tiers' decode flags: their memory bound follows from them.
const DECODES: u64 = 2;
const MAX_PIXELS: u64 = 16 << 20;
const UPSTREAM_IMAGE_CACHE: u64 = 2 << 20;

const UNARY_CALLERS: u64 = 6;
const STREAM_CALLERS: u64 = 2;
/// Streams the hostile stream callers may have working on items at once (the malformed-item one).
const HOSTILE_STREAMS_WITH_ITEMS: u64 = 1;
/// Every caller's deadline: far beyond a normal call, and beyond two upstream timeouts in a row.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
const STREAM_DEADLINE: Duration = Duration::from_secs(90);
/// How long after a replica serves again a failure may still be put down to the event.
const GRACE: Duration = Duration::from_secs(2);
/// Streams a burst opens at once: eight more than the cap.
const BURST: usize = MAX_OPEN_STREAMS + 8;

const TOKENS: [&str; 2] = ["soak-token-one", "soak-token-two"];
const WRONG_TOKEN: &str = "soak-token-wrong";
const URL_PASSWORD: &str = "soak-url-password";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Generator,
    Ranker,
}

impl Role {
    fn service(self) -> &'static str {
        match self {
            Role::Generator => "caption.v1.Generator",
            Role::Ranker => "caption.v1.Ranker",
        }
    }
}

/// What a case may be answered: `always`, and `in_chaos` too when the call overlapped a chaos
/// event on a replica of a role it `reaches` (one a stopped replica holds past
/// --upstream-timeout is DEADLINE_EXCEEDED; one whose replica was killed is retried on the
/// other, and UNAVAILABLE only when the retry budget is spent).
struct Rule {
    case: &'static str,
    always: &'static [Code],
    in_chaos: &'static [Code],
    reaches: &'static [Role],
}

const CHAOS: &[Code] = &[Code::Unavailable, Code::DeadlineExceeded];
const BOTH: &[Role] = &[Role::Generator, Role::Ranker];
/// An image the generator refuses never reaches a ranker.
const GENERATOR: &[Role] = &[Role::Generator];
/// Refused by the cascade tier itself.
const NONE: &[Role] = &[];

const fn rule(case: &'static str, always: &'static [Code], reaches: &'static [Role]) -> Rule {
    let in_chaos = if reaches.is_empty() { &[] } else { CHAOS };
    Rule { case, always, in_chaos, reaches }
}

const OK: &[Code] = &[Code::Ok];
const INVALID: &[Code] = &[Code::InvalidArgument];

const FRESH: Rule = rule("Caption: fresh scene", OK, BOTH);
const SEEDED: Rule = rule("Caption: seeded scene, answer checked", OK, BOTH);
const BY_URL: Rule = rule("Caption: by URL, answer checked", OK, BOTH);
const LARGE: Rule = rule("Caption: 3000 x 2000 PNG", OK, BOTH);
const NO_TOKEN: Rule = rule("Caption: no bearer token", &[Code::Unauthenticated], NONE);
const BAD_TOKEN: Rule = rule("Caption: wrong bearer token", &[Code::Unauthenticated], NONE);
const GARBAGE: Rule = rule("Caption: undecodable image (garbage)", INVALID, GENERATOR);
const TRUNCATED: Rule = rule("Caption: truncated PNG", INVALID, GENERATOR);
const CLAIMING: Rule = rule("Caption: PNG claiming 100000 x 100000", INVALID, GENERATOR);
const ZERO: Rule = rule("Caption: 0 x 0 GIF", INVALID, GENERATOR);
const ODD: Rule = rule("Caption: odd params (10 kinds)", INVALID, NONE);
const OVERSIZE: Rule = rule("Caption: message over --max-message-bytes", &[Code::ResourceExhausted], NONE);
const NOT_UTF8: Rule = rule("Caption: URL not UTF-8 (raw bytes)", INVALID, NONE);
const CREDENTIALS: Rule = rule("Caption: URL with credentials", INVALID, NONE);
const NUL_HOST: Rule = rule("Caption: URL with NUL in the host", INVALID, NONE);
// The parser percent-encodes a control character inside the path (it strips one at either end
// of the URL): the origin has no such path.
const CTRL_PATH: Rule = rule("Caption: URL with a control char in the path", &[Code::FailedPrecondition], NONE);
// The parser drops CR and LF, so nothing is injected; the path it leaves does not exist.
const CRLF: Rule = rule("Caption: URL with CR LF and a header", &[Code::FailedPrecondition], NONE);
// Percent-encoded; the origin ignores queries, so the image is found.
const ESC_QUERY: Rule = rule("Caption: URL with ESC in the query", OK, BOTH);

// Items of streams, and how streams end.
const ITEM: Rule = rule("CaptionStream item: scene", OK, BOTH);
const ITEM_BAD: Rule = rule("CaptionStream item: undecodable image", INVALID, GENERATOR);
const STREAM_END: Rule = rule("CaptionStream: end", OK, NONE);
const MALFORMED_END: Rule = rule("CaptionStream with a malformed item: end", INVALID, NONE);
// A place among the open streams is not guaranteed: the burst and the idle streams take them.
const IDLE: Rule = rule("CaptionStream left idle", &[Code::DeadlineExceeded, Code::ResourceExhausted], NONE);
const BURSTING: Rule =
    rule("CaptionStream in a burst past the cap", &[Code::DeadlineExceeded, Code::ResourceExhausted], NONE);

/// A loopback address of this process's own for replica `k` (0..4): 127.B.C.D from the process
/// id, B in 200..240 so that it is none of tests/split_topology.rs's. A replica killed here is
/// restarted on the port it had, which nothing else can take on an address of our own.
fn own_loopback_ip(k: u32) -> String {
    let pid = std::process::id();
    format!("127.{}.{}.{}", 200 + 10 * k + pid / 65024 % 10, pid / 254 % 256, 1 + pid % 254)
}

/// A server process listening on `listen`, its metrics on a port of their own, logging at INFO.
fn tier(listen: &str, args: &[String]) -> common::process::Starting {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::server(&args).listen(listen).metrics().env("RUST_LOG", "info").env("NO_COLOR", "1").spawn()
}

fn signal(pid: u32, name: &str) {
    let sent = Command::new("kill").args([name, &pid.to_string()]).status().unwrap();
    assert!(sent.success(), "kill {name} {pid}");
}

/// The sum of the samples whose line starts with `prefix` at `metrics`; None when it does not answer.
async fn metric(metrics: SocketAddr, prefix: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{metrics}/metrics")).await.ok()?.text().await.ok()?;
    Some(text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum())
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

const NOT_UTF8_BYTES: &[u8] = b"http://caf\xe9/\xff";

/// A GIF whose logical screen is 0 x 0 pixels.
const ZERO_GIF: &[u8] = b"GIF89a\x00\x00\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A PNG whose header claims `width` × `height` (CRC fixed up), with a one-pixel body.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = png(&image::RgbImage::new(1, 1));
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = 0xFFFF_FFFFu32;
    for &b in &bytes[12..29] {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    bytes[29..33].copy_from_slice(&(!crc).to_be_bytes());
    bytes
}

fn url_image(url: String) -> Option<pb::Image> {
    Some(pb::Image { source: Some(pb::image::Source::Url(url)) })
}

/// Cheap parameters for the normal calls; with a seed the answer is the same on every replica.
fn params(seed: Option<u64>) -> Option<pb::GenerationParams> {
    Some(pb::GenerationParams { num_candidates: Some(4), max_length: Some(16), seed, ..Default::default() })
}

fn caption_request(image: Option<pb::Image>, params: Option<pb::GenerationParams>) -> pb::CaptionRequest {
    pb::CaptionRequest { image, params, top_k: Some(2), ..Default::default() }
}

/// `message` with a bearer token (or none) and a deadline.
fn authed<T>(message: T, token: Option<&str>, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(token) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    req.set_timeout(timeout);
    req
}

/// A span of time in which a replica of `role` was killed or stopped and not yet serving again.
struct Window {
    role: Role,
    start: Instant,
    end: Option<Instant>,
}

/// What the callers saw: counts per case and label, stream items sent and answered, chaos
/// windows, and every answer no rule allows.
struct Tally {
    start: Instant,
    counts: Mutex<BTreeMap<(String, String), u64>>,
    items: Mutex<BTreeMap<&'static str, (u64, u64)>>,
    windows: Mutex<Vec<Window>>,
    violations: Mutex<Vec<String>>,
}

impl Tally {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            counts: Default::default(),
            items: Default::default(),
            windows: Default::default(),
            violations: Default::default(),
        }
    }

    fn at(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64()
    }

    fn count(&self, case: &str, label: String) {
        *self.counts.lock().unwrap().entry((case.to_string(), label)).or_default() += 1;
    }

    fn violation(&self, text: String) {
        eprintln!("VIOLATION: {text}");
        self.violations.lock().unwrap().push(text);
    }

    fn overlaps_chaos(&self, roles: &[Role], from: Instant, to: Instant) -> bool {
        self.windows
            .lock()
            .unwrap()
            .iter()
            .any(|w| roles.contains(&w.role) && w.start <= to && w.end.is_none_or(|e| e >= from))
    }

    /// Counts `got` under `rule`'s case, or records a violation when the rule does not allow it.
    fn judge(&self, rule: &Rule, got: Code, from: Instant, message: &str) {
        let to = Instant::now();
        let label = if rule.always.contains(&got) {
            format!("{got:?}")
        } else if rule.in_chaos.contains(&got) && self.overlaps_chaos(rule.reaches, from, to) {
            // Callers' deadlines are far off: only the cascade's bound on a stopped upstream ends a call.
            if got == Code::DeadlineExceeded && !message.contains("--upstream-timeout") {
                self.violation(format!("{}: DEADLINE_EXCEEDED not from --upstream-timeout: {message:?}", rule.case));
            }
            format!("{got:?} (in chaos)")
        } else {
            let shown: String = message.chars().take(300).collect();
            self.violation(format!("{}: {got:?} at {:.1}-{:.1} s: {shown:?}", rule.case, self.at(from), self.at(to)));
            format!("{got:?} (NOT ALLOWED)")
        };
        self.count(rule.case, label);
    }

    fn items(&self, case: &'static str, sent: u64, answered: u64) {
        let mut items = self.items.lock().unwrap();
        let entry = items.entry(case).or_default();
        entry.0 += sent;
        entry.1 += answered;
    }

    fn open_window(&self, role: Role) -> usize {
        let mut windows = self.windows.lock().unwrap();
        windows.push(Window { role, start: Instant::now(), end: None });
        windows.len() - 1
    }

    fn close_window(&self, index: usize, end: Instant) {
        self.windows.lock().unwrap()[index].end = Some(end);
    }
}

/// One lifetime of a process: its RSS once started, the most sampled, and the last.
#[derive(Debug, Clone, Copy)]
struct Life {
    base_kb: u64,
    peak_kb: u64,
    last_kb: u64,
}

struct Watched {
    name: String,
    /// What the bound allows over a lifetime's base.
    allowance_kb: u64,
    pid: Option<u32>,
    lives: Vec<Life>,
}

/// The RSS of every process of the topology, sampled every 200 ms; a restarted one starts a
/// lifetime of its own, with its own base.
#[derive(Default)]
struct Memory(Mutex<Vec<Watched>>);

impl Memory {
    fn life(pid: u32) -> Life {
        let kb = status_kb(pid, "VmRSS:").expect("a started process");
        Life { base_kb: kb, peak_kb: kb, last_kb: kb }
    }

    fn watch(&self, name: &str, allowance_kb: u64, pid: u32) -> usize {
        let mut all = self.0.lock().unwrap();
        all.push(Watched { name: name.into(), allowance_kb, pid: Some(pid), lives: vec![Self::life(pid)] });
        all.len() - 1
    }

    /// Before a process is killed: its id may be another's soon.
    fn gone(&self, slot: usize) {
        self.0.lock().unwrap()[slot].pid = None;
    }

    fn restarted(&self, slot: usize, pid: u32) {
        let mut all = self.0.lock().unwrap();
        all[slot].pid = Some(pid);
        all[slot].lives.push(Self::life(pid));
    }

    fn sample(&self, field: &str) {
        for w in self.0.lock().unwrap().iter_mut() {
            if let Some(kb) = w.pid.and_then(|pid| status_kb(pid, field)) {
                let life = w.lives.last_mut().unwrap();
                life.peak_kb = life.peak_kb.max(kb);
                if field == "VmRSS:" {
                    life.last_kb = kb;
                }
            }
        }
    }
}

struct Ctx {
    cascade: SocketAddr,
    metrics: SocketAddr,
    http: SocketAddr,
    /// Fixed scenes; the origin serves the first as /scene.png.
    scenes: Vec<Vec<u8>>,
    /// The candidates each (scene, seed) got before any chaos.
    references: HashMap<(usize, u64), Vec<String>>,
    large: Vec<u8>,
    tally: Tally,
    deadline: Instant,
}

const SEEDS: u64 = 3;

impl Ctx {
    fn check_reference(&self, rule: &Rule, reference: Option<(usize, u64)>, answer: &pb::CaptionResponse) {
        let Some(key) = reference else { return };
        if answer.candidates != self.references[&key] {
            self.tally.violation(format!(
                "{}: scene {} seed {}: candidates {:?}, before the chaos {:?}",
                rule.case, key.0, key.1, answer.candidates, self.references[&key]
            ));
        }
    }

    /// A fixed scene and a seed: its request and the key of its reference answer.
    fn seeded(&self, rng: &mut StdRng) -> (pb::CaptionRequest, (usize, u64)) {
        let key = (rng.random_range(0..self.scenes.len()), rng.random_range(0..SEEDS));
        (caption_request(png_image(self.scenes[key.0].clone()), params(Some(key.1))), key)
    }

    fn by_url(&self, rng: &mut StdRng) -> (pb::CaptionRequest, (usize, u64)) {
        let seed = rng.random_range(0..SEEDS);
        let url = format!("http://{}/scene.png?n={}", self.http, rng.random::<u32>());
        (caption_request(url_image(url), params(Some(seed))), (0, seed))
    }

    fn token(rng: &mut StdRng) -> Option<&'static str> {
        Some(TOKENS[rng.random_range(0..TOKENS.len())])
    }
}

/// One unary call as sent: a message or raw bytes, the token, what its error must say and
/// whose answer it must equal.
struct Planned {
    body: Result<pb::CaptionRequest, Vec<u8>>,
    token: Option<&'static str>,
    says: String,
    reference: Option<(usize, u64)>,
}

/// Each unary case with its weight.
const UNARY_CASES: &[(&Rule, u32)] = &[
    (&FRESH, 18),
    (&SEEDED, 14),
    (&BY_URL, 10),
    (&LARGE, 2),
    (&NO_TOKEN, 4),
    (&BAD_TOKEN, 4),
    (&GARBAGE, 4),
    (&TRUNCATED, 3),
    (&CLAIMING, 3),
    (&ZERO, 2),
    (&ODD, 8),
    (&OVERSIZE, 1),
    (&NOT_UTF8, 3),
    (&CREDENTIALS, 3),
    (&NUL_HOST, 2),
    (&CTRL_PATH, 2),
    (&CRLF, 2),
    (&ESC_QUERY, 2),
];

/// Odd parameters, each refused by the cascade tier naming its field.
fn odd_params(n: usize) -> (pb::CaptionRequest, &'static str) {
    let p = |params: pb::GenerationParams| Some(params);
    // Beam search's own fields are checked only when beam search is asked for.
    let beam = pb::Decoding::Beam as i32;
    let (params, top_k, field) = match n % 10 {
        0 => (p(pb::GenerationParams { num_candidates: Some(1000), ..Default::default() }), None, "num_candidates"),
        1 => (p(pb::GenerationParams { max_length: Some(100_000), ..Default::default() }), None, "max_length"),
        2 => (p(pb::GenerationParams { top_p: Some(5.0), ..Default::default() }), None, "top_p"),
        3 => (p(pb::GenerationParams { temperature: Some(f32::NAN), ..Default::default() }), None, "temperature"),
        4 => (p(pb::GenerationParams { decoding: 42, ..Default::default() }), None, "decoding"),
        5 => (
            p(pb::GenerationParams { decoding: beam, num_beams: Some(100_000), ..Default::default() }),
            None,
            "num_beams",
        ),
        6 => (p(pb::GenerationParams { prompt: Some("a".repeat(100_000)), ..Default::default() }), None, "prompt"),
        7 => (
            p(pb::GenerationParams { decoding: beam, length_penalty: Some(f32::INFINITY), ..Default::default() }),
            None,
            "length_penalty",
        ),
        8 => (
            p(pb::GenerationParams { min_length: Some(50), max_length: Some(10), ..Default::default() }),
            None,
            "min_length",
        ),
        _ => (params(None), Some(0), "top_k"),
    };
    let png = draw_scene(&mut StdRng::seed_from_u64(n as u64)).png();
    (pb::CaptionRequest { image: png_image(png), params, top_k, ..Default::default() }, field)
}

fn plan(ctx: &Ctx, rng: &mut StdRng, rule: &'static Rule) -> Planned {
    let token = Ctx::token(rng);
    let typed = |req: pb::CaptionRequest| Planned { body: Ok(req), token, says: String::new(), reference: None };
    let scene = || png_image(draw_scene(&mut StdRng::seed_from_u64(rand::random())).png());
    let http = ctx.http;
    match rule.case {
        c if c == FRESH.case => typed(caption_request(scene(), params(None))),
        c if c == SEEDED.case || c == BY_URL.case => {
            let (req, key) = if c == SEEDED.case { ctx.seeded(rng) } else { ctx.by_url(rng) };
            Planned { reference: Some(key), ..typed(req) }
        }
        c if c == LARGE.case => {
            // Bytes after the PNG's end change the digest, so each is decoded afresh.
            let bytes = [ctx.large.as_slice(), &rng.random::<u64>().to_le_bytes()].concat();
            typed(caption_request(png_image(bytes), params(None)))
        }
        c if c == NO_TOKEN.case => Planned {
            token: None,
            says: "needs a bearer token".into(),
            ..typed(caption_request(scene(), params(None)))
        },
        c if c == BAD_TOKEN.case => Planned {
            token: Some(WRONG_TOKEN),
            says: "not valid".into(),
            ..typed(caption_request(scene(), params(None)))
        },
        c if c == GARBAGE.case => typed(caption_request(png_image(b"\x89PNG but not really".to_vec()), params(None))),
        c if c == TRUNCATED.case => {
            let whole = &ctx.scenes[1];
            typed(caption_request(png_image(whole[..whole.len() / 2].to_vec()), params(None)))
        }
        c if c == CLAIMING.case => Planned {
            says: "--max-image-pixels".into(),
            ..typed(caption_request(png_image(png_claiming(100_000, 100_000)), params(None)))
        },
        c if c == ZERO.case => typed(caption_request(png_image(ZERO_GIF.to_vec()), params(None))),
        c if c == ODD.case => {
            let (req, field) = odd_params(rng.random_range(0..10));
            Planned { says: field.into(), ..typed(req) }
        }
        c if c == OVERSIZE.case => {
            let bytes = vec![7u8; CASCADE_MESSAGE_BYTES as usize + (1 << 20)];
            typed(caption_request(png_image(bytes), params(None)))
        }
        c if c == NOT_UTF8.case => Planned {
            body: Err(field(1, &field(1, NOT_UTF8_BYTES))),
            says: "UTF-8".into(),
            ..typed(Default::default())
        },
        c if c == CREDENTIALS.case => Planned {
            says: "credentials in image URLs are not accepted".into(),
            ..typed(caption_request(url_image(format!("http://soak:{URL_PASSWORD}@{http}/scene.png")), params(None)))
        },
        c if c == NUL_HOST.case => {
            typed(caption_request(url_image("http://127.0.0.1\0/scene.png".into()), params(None)))
        }
        c if c == CTRL_PATH.case => Planned {
            says: "404".into(),
            ..typed(caption_request(url_image(format!("http://{http}/sce\u{1}ne.png")), params(None)))
        },
        c if c == CRLF.case => Planned {
            says: "404".into(),
            ..typed(caption_request(url_image(format!("http://{http}/scene.png\r\nX-Injected: yes\r\n")), params(None)))
        },
        c if c == ESC_QUERY.case => {
            let seed = rng.random_range(0..SEEDS);
            let url = format!("http://{http}/scene.png?\u{1b}[2J\u{1b}[31m{}", rng.random::<u32>());
            Planned { reference: Some((0, seed)), ..typed(caption_request(url_image(url), params(Some(seed)))) }
        }
        other => unreachable!("no plan for {other}"),
    }
}

async fn send(ch: &Channel, planned: Planned) -> Result<pb::CaptionResponse, Status> {
    match planned.body {
        Ok(req) => {
            let mut client = CascadeClient::new(ch.clone()).max_encoding_message_size(usize::MAX);
            client.caption(authed(req, planned.token, CALL_DEADLINE)).await.map(|r| r.into_inner())
        }
        Err(bytes) => {
            let mut grpc = tonic::client::Grpc::new(ch.clone());
            grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
            let path = http::uri::PathAndQuery::from_static("/caption.v1.Cascade/Caption");
            let req = authed(bytes, planned.token, CALL_DEADLINE);
            grpc.unary(req, path, Raw::<pb::CaptionResponse>::new()).await.map(|r| r.into_inner())
        }
    }
}

fn pick(rng: &mut StdRng) -> &'static Rule {
    let total: u32 = UNARY_CASES.iter().map(|(_, w)| w).sum();
    let mut n = rng.random_range(0..total);
    for (rule, weight) in UNARY_CASES {
        if n < *weight {
            return rule;
        }
        n -= weight;
    }
    unreachable!()
}

async fn unary_caller(ctx: Arc<Ctx>, worker: u64) {
    let ch = common::channel(ctx.cascade).await;
    let mut rng = StdRng::seed_from_u64(100 + worker);
    while Instant::now() < ctx.deadline {
        let rule = pick(&mut rng);
        let planned = plan(&ctx, &mut rng, rule);
        let (says, reference) = (planned.says.clone(), planned.reference);
        let start = Instant::now();
        // Every call returns: its deadline is CALL_DEADLINE, and this waits a while longer.
        match tokio::time::timeout(CALL_DEADLINE + Duration::from_secs(15), send(&ch, planned)).await {
            Err(_) => ctx.tally.violation(format!("{}: no answer in {:?}", rule.case, start.elapsed())),
            Ok(Ok(answer)) => {
                ctx.tally.judge(rule, Code::Ok, start, &says);
                if rule.always.contains(&Code::Ok) {
                    ctx.check_reference(rule, reference, &answer);
                    if answer.captions.is_empty() {
                        ctx.tally.violation(format!("{}: an answer with no captions", rule.case));
                    }
                }
            }
            Ok(Err(status)) => {
                ctx.tally.judge(rule, status.code(), start, status.message());
                if rule.always.contains(&status.code()) && !status.message().contains(&says) {
                    ctx.tally.violation(format!("{}: {:?} should say {says:?}", rule.case, status.message()));
                }
                if status.message().contains(URL_PASSWORD) {
                    ctx.tally.violation(format!("{}: the answer shows the URL's password", rule.case));
                }
            }
        }
    }
}

type Answers = tonic::Streaming<pb::CaptionStreamResponse>;

/// Opens a CaptionStream whose requests come from the returned sender, trying again while the
/// cap on open streams refuses it (as its message asks): the refusals are counted under `case`.
async fn open_stream(
    ctx: &Ctx,
    ch: &Channel,
    token: Option<&str>,
    case: &str,
) -> Result<(mpsc::Sender<pb::CaptionStreamRequest>, Answers), Status> {
    let start = Instant::now();
    loop {
        let (tx, rx) = mpsc::channel(STREAM_INFLIGHT * 2);
        let req = authed(ReceiverStream::new(rx), token, STREAM_DEADLINE);
        match CascadeClient::new(ch.clone()).caption_stream(req).await {
            Ok(answers) => return Ok((tx, answers.into_inner())),
            Err(s) if s.code() == Code::ResourceExhausted && s.message().contains("--max-open-streams") => {
                ctx.tally.count(case, "note: open refused RESOURCE_EXHAUSTED, retried".into());
                if start.elapsed() > Duration::from_secs(60) {
                    return Err(s);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// One item of a stream: its request, its rule and the reference its answer must equal.
struct Item {
    request: pb::CaptionStreamRequest,
    rule: &'static Rule,
    reference: Option<(usize, u64)>,
}

/// An item sent on a stream and not answered yet: when it was sent, its rule and its reference.
struct Sent {
    at: Instant,
    rule: &'static Rule,
    reference: Option<(usize, u64)>,
}

type Unanswered = Arc<Mutex<HashMap<String, Sent>>>;

/// Sends `items` 50 ms apart on a stream of its own, then closes the request side; every item
/// must be answered, each under its rule, and the stream must end OK.
async fn run_stream(ctx: &Ctx, ch: &Channel, rng: &mut StdRng, items: Vec<Item>) {
    let (tx, mut answers) = match open_stream(ctx, ch, Ctx::token(rng), STREAM_END.case).await {
        Ok(opened) => opened,
        Err(s) => return ctx.tally.violation(format!("{}: not opened: {s:?}", STREAM_END.case)),
    };
    let start = Instant::now();
    let unanswered: Unanswered = Arc::new(Mutex::new(
        items
            .iter()
            .map(|i| (i.request.id.clone(), Sent { at: Instant::now(), rule: i.rule, reference: i.reference }))
            .collect(),
    ));
    let n = items.len() as u64;
    let sender = {
        let unanswered = unanswered.clone();
        tokio::spawn(async move {
            for item in items {
                unanswered.lock().unwrap().get_mut(&item.request.id).unwrap().at = Instant::now();
                if tx.send(item.request).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut answered = 0u64;
    let end = tokio::time::timeout(STREAM_DEADLINE + Duration::from_secs(15), async {
        loop {
            match answers.message().await {
                Ok(Some(answer)) => {
                    let Some(Sent { at: from, rule, reference }) = unanswered.lock().unwrap().remove(&answer.id) else {
                        ctx.tally.violation(format!("stream: {:?} answered twice, or never sent", answer.id));
                        continue;
                    };
                    answered += 1;
                    match answer.result {
                        Some(pb::caption_stream_response::Result::Response(r)) => {
                            ctx.tally.judge(rule, Code::Ok, from, "");
                            if rule.always.contains(&Code::Ok) {
                                ctx.check_reference(rule, reference, &r);
                            }
                        }
                        Some(pb::caption_stream_response::Result::Error(e)) => {
                            ctx.tally.judge(rule, Code::from_i32(e.code), from, &e.message)
                        }
                        None => ctx.tally.violation(format!("stream: answer {:?} has no result", answer.id)),
                    }
                }
                Ok(None) => return Code::Ok,
                Err(status) => {
                    ctx.tally.judge(&STREAM_END, status.code(), start, status.message());
                    return status.code();
                }
            }
        }
    })
    .await;
    let _ = sender.await;
    match end {
        Err(_) => ctx.tally.violation(format!("stream: no end in {:?}", start.elapsed())),
        Ok(Code::Ok) => ctx.tally.judge(&STREAM_END, Code::Ok, start, ""),
        Ok(_) => {}
    }
    ctx.tally.items(STREAM_END.case, n, answered);
    if answered != n {
        ctx.tally.violation(format!("stream: {answered} of {n} items answered"));
    }
}

async fn stream_caller(ctx: Arc<Ctx>, worker: u64) {
    let ch = common::channel(ctx.cascade).await;
    let mut rng = StdRng::seed_from_u64(200 + worker);
    let mut n = 0u64;
    while Instant::now() < ctx.deadline {
        let mut items = Vec::new();
        for i in 0..rng.random_range(2..=6) {
            n += 1;
            let id = format!("{worker}-{n}");
            let (request, reference) = match i % 3 {
                0 => (caption_request(png_image(draw_scene(&mut rng).png()), params(None)), None),
                1 => {
                    let (req, key) = ctx.seeded(&mut rng);
                    (req, Some(key))
                }
                _ => {
                    let (req, key) = ctx.by_url(&mut rng);
                    (req, Some(key))
                }
            };
            items.push(Item {
                request: pb::CaptionStreamRequest { id, request: Some(request) },
                rule: &ITEM,
                reference,
            });
        }
        // Now and then an image no generator can decode, among good ones: it is answered on its
        // own and the stream goes on.
        if rng.random_ratio(1, 3) {
            n += 1;
            let request = caption_request(png_image(b"not an image".to_vec()), params(None));
            let request = pb::CaptionStreamRequest { id: format!("{worker}-{n}"), request: Some(request) };
            let at = rng.random_range(0..=items.len());
            items.insert(at, Item { request, rule: &ITEM_BAD, reference: None });
        }
        run_stream(&ctx, &ch, &mut rng, items).await;
    }
}

/// Opens a stream that sends nothing and keeps its request side open: the cascade ends it once
/// idle for --stream-idle-timeout, or refuses it while the cap is reached. Returns whether it
/// was accepted, and when the open was answered.
async fn idle_stream(ctx: &Ctx, ch: &Channel, rule: &'static Rule) -> (bool, Instant) {
    let start = Instant::now();
    let req = authed(futures::stream::pending::<pb::CaptionStreamRequest>(), Some(TOKENS[0]), STREAM_DEADLINE);
    let mut answers = match CascadeClient::new(ch.clone()).caption_stream(req).await {
        Ok(answers) => answers.into_inner(),
        Err(s) => {
            ctx.tally.judge(rule, s.code(), start, s.message());
            return (false, Instant::now());
        }
    };
    let opened = Instant::now();
    match tokio::time::timeout(IDLE_TIMEOUT + Duration::from_secs(20), answers.message()).await {
        Err(_) => ctx.tally.violation(format!("{}: not ended in {:?}", rule.case, opened.elapsed())),
        Ok(Ok(answer)) => ctx.tally.violation(format!("{}: answered {answer:?}", rule.case)),
        Ok(Err(s)) => {
            ctx.tally.judge(rule, s.code(), start, s.message());
            // The idle timer starts once the stream is open; allow for the timer's granularity.
            if s.code() == Code::DeadlineExceeded && opened.elapsed() + Duration::from_millis(100) < IDLE_TIMEOUT {
                ctx.tally.violation(format!("{}: ended after {:?}", rule.case, opened.elapsed()));
            }
        }
    }
    (true, opened)
}

/// Idle streams, one after another, and every 30 s a burst of BURST at once: at most
/// MAX_OPEN_STREAMS of a burst can be open together, so at least BURST - MAX_OPEN_STREAMS are
/// refused.
async fn idle_caller(ctx: Arc<Ctx>) {
    let ch = common::channel(ctx.cascade).await;
    let mut last_burst = Instant::now();
    while Instant::now() < ctx.deadline {
        if last_burst.elapsed() >= Duration::from_secs(30) {
            last_burst = Instant::now();
            let start = Instant::now();
            let opened = futures::future::join_all((0..BURST).map(|_| idle_stream(&ctx, &ch, &BURSTING))).await;
            let accepted = opened.iter().filter(|(accepted, _)| *accepted).count();
            let last_answered = opened.iter().map(|(_, at)| *at).max().unwrap();
            // Valid only if every open was answered before the first accepted one could end.
            if last_answered - start < IDLE_TIMEOUT && accepted > MAX_OPEN_STREAMS {
                ctx.tally.violation(format!("a burst of {BURST}: {accepted} streams open at once"));
            }
            ctx.tally.count(BURSTING.case, format!("note: a burst, {accepted} of {BURST} accepted"));
        } else {
            idle_stream(&ctx, &ch, &IDLE).await;
        }
    }
}

/// Streams whose second item does not decode (a URL that is not UTF-8), sent as raw bytes: the
/// first is answered, then the stream ends INVALID_ARGUMENT.
async fn malformed_caller(ctx: Arc<Ctx>) {
    let ch = common::channel(ctx.cascade).await;
    let mut rng = StdRng::seed_from_u64(300);
    let mut n = 0u64;
    while Instant::now() < ctx.deadline {
        n += 1;
        let (good, key) = ctx.seeded(&mut rng);
        let good_id = format!("good-{n}");
        let good = pb::CaptionStreamRequest { id: good_id.clone(), request: Some(good) }.encode_to_vec();
        let bad = [field(1, format!("bad-{n}").as_bytes()), field(2, &field(1, &field(1, NOT_UTF8_BYTES)))].concat();
        let start = Instant::now();
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        if let Err(e) = grpc.ready().await {
            ctx.tally.violation(format!("{}: channel not ready: {e}", MALFORMED_END.case));
            continue;
        }
        let path = http::uri::PathAndQuery::from_static("/caption.v1.Cascade/CaptionStream");
        let req = authed(tokio_stream::iter([good, bad]), Ctx::token(&mut rng), STREAM_DEADLINE);
        let run = async {
            let mut answers = match grpc.streaming(req, path, Raw::<pb::CaptionStreamResponse>::new()).await {
                Ok(answers) => answers.into_inner(),
                Err(s) if s.code() == Code::ResourceExhausted => {
                    ctx.tally.count(MALFORMED_END.case, "note: open refused RESOURCE_EXHAUSTED".into());
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    return;
                }
                Err(s) => return ctx.tally.judge(&MALFORMED_END, s.code(), start, s.message()),
            };
            let mut answered = 0;
            loop {
                match answers.message().await {
                    Ok(Some(answer)) if answer.id == good_id && answered == 0 => {
                        answered += 1;
                        match answer.result {
                            Some(pb::caption_stream_response::Result::Response(r)) => {
                                ctx.tally.judge(&ITEM, Code::Ok, start, "");
                                ctx.check_reference(&ITEM, Some(key), &r);
                            }
                            Some(pb::caption_stream_response::Result::Error(e)) => {
                                ctx.tally.judge(&ITEM, Code::from_i32(e.code), start, &e.message)
                            }
                            None => ctx.tally.violation("malformed stream: an answer with no result".into()),
                        }
                    }
                    Ok(Some(answer)) => ctx.tally.violation(format!("malformed stream: answered {:?}", answer.id)),
                    Ok(None) => {
                        ctx.tally.violation("malformed stream: ended OK after an item that does not decode".into());
                        break;
                    }
                    Err(s) => {
                        ctx.tally.judge(&MALFORMED_END, s.code(), start, s.message());
                        if s.code() == Code::InvalidArgument && !s.message().contains("UTF-8") {
                            ctx.tally.violation(format!("malformed stream: {:?} should say UTF-8", s.message()));
                        }
                        break;
                    }
                }
            }
            ctx.tally.items(MALFORMED_END.case, 1, answered);
            if answered != 1 {
                ctx.tally.violation("malformed stream: the item before the malformed one was not answered".into());
            }
        };
        if tokio::time::timeout(STREAM_DEADLINE + Duration::from_secs(15), run).await.is_err() {
            ctx.tally.violation(format!("{}: no end in {:?}", MALFORMED_END.case, start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A generator or ranker process, restarted where it was when killed.
struct Replica {
    name: String,
    role: Role,
    listen: String,
    args: Vec<String>,
    process: Option<ServerProcess>,
    slot: usize,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Kill,
    Stop(Duration),
}

/// One replica at a time, in turn: killed (-9) and restarted on its address, or stopped for 3 s
/// (under --upstream-timeout) or 8 s (over it) and continued; the next event waits until the
/// cascade has both replicas of that role serving again, and 6 s more.
async fn chaos(ctx: Arc<Ctx>, mut replicas: Vec<Replica>, memory: Arc<Memory>) -> (Vec<Replica>, Vec<String>) {
    let mut events = Vec::new();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut i = 0usize;
    // An event needs up to half a minute (a restart loads the models); none starts near the end.
    while Instant::now() + Duration::from_secs(30) < ctx.deadline {
        let r = &mut replicas[[0, 2, 1, 3][i % 4]];
        // Four replicas and three actions: every pair comes round in twelve events.
        let action = match i % 3 {
            0 => Action::Kill,
            1 => Action::Stop(Duration::from_secs(3)),
            _ => Action::Stop(Duration::from_secs(8)),
        };
        let start = Instant::now();
        let window = ctx.tally.open_window(r.role);
        match action {
            Action::Kill => {
                memory.gone(r.slot);
                r.process.take().expect("a running replica").kill();
                let restarted = tier(&r.listen, &r.args).ready().await;
                memory.restarted(r.slot, restarted.id());
                r.process = Some(restarted);
            }
            Action::Stop(pause) => {
                let pid = r.process.as_ref().unwrap().id();
                signal(pid, "-STOP");
                tokio::time::sleep(pause).await;
                signal(pid, "-CONT");
            }
        }
        let gauge = format!("caption_upstream_replicas{{service=\"{}\"}}", r.role.service());
        let back = loop {
            if metric(ctx.metrics, &gauge).await == Some(2.0) {
                break true;
            }
            if start.elapsed() > Duration::from_secs(180) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if !back {
            ctx.tally.violation(format!("{} was not serving again within 180 s of {action:?}", r.name));
        }
        ctx.tally.close_window(window, Instant::now() + GRACE);
        events.push(format!(
            "{:>6.1} s  {:<12} {:<10} serving again after {:.1} s",
            ctx.tally.at(start),
            r.name,
            match action {
                Action::Kill => "kill -9".to_string(),
                Action::Stop(d) => format!("STOP {} s", d.as_secs()),
            },
            start.elapsed().as_secs_f64()
        ));
        for other in replicas.iter_mut() {
            if let Some(p) = other.process.as_mut() {
                if let Ok(Some(status)) = p.child().try_wait() {
                    ctx.tally.violation(format!("{} exited: {status}", other.name));
                }
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    (replicas, events)
}

/// A token file, removed when dropped.
struct TokenFile(PathBuf);

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

/// The mixed soak against the split topology for `SOAK_SECONDS` (default 600).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "ten minutes; run with `make soak`"]
async fn soak_split_topology_with_hostile_callers_and_chaos() {
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let mut rng = StdRng::seed_from_u64(21);
    let scenes: Vec<Vec<u8>> = (0..4).map(|_| draw_scene(&mut rng).png()).collect();
    let http = common::http::http_server(scenes[0].clone()).await;

    // The model tiers: two of each role, each on a loopback address of its own.
    let upstream_args = |role: &str| -> Vec<String> {
        let decodes = DECODES.to_string();
        let pixels = MAX_PIXELS.to_string();
        let cache = UPSTREAM_IMAGE_CACHE.to_string();
        ["--services", role, "--max-concurrent-decodes", &decodes, "--max-image-pixels", &pixels]
            .into_iter()
            .chain(["--image-cache-bytes", &cache])
            .map(String::from)
            .collect()
    };
    let layout = [
        ("generator-1", Role::Generator),
        ("generator-2", Role::Generator),
        ("ranker-1", Role::Ranker),
        ("ranker-2", Role::Ranker),
    ];
    let starting: Vec<_> = layout
        .iter()
        .enumerate()
        .map(|(k, (_, role))| {
            let args = upstream_args(if *role == Role::Generator { "generator" } else { "ranker" });
            let listen = format!("{}:0", own_loopback_ip(k as u32));
            (tier(&listen, &args), args)
        })
        .collect();
    let memory = Arc::new(Memory::default());
    // A model tier's bound (README, Memory bound): a full-resolution decode in each lane, and its cache.
    let upstream_allowance_kb = (DECODES * (MAX_PIXELS + SMALL_IMAGE_PIXELS) * 11 + UPSTREAM_IMAGE_CACHE) / 1024;
    let mut replicas = Vec::new();
    for ((name, role), (starting, args)) in layout.iter().zip(starting) {
        let process = starting.ready().await;
        let slot = memory.watch(name, upstream_allowance_kb, process.id());
        replicas.push(Replica {
            name: name.to_string(),
            role: *role,
            listen: process.addr().to_string(),
            args,
            process: Some(process),
            slot,
        });
    }
    let endpoints = |role: Role| {
        let urls: Vec<String> =
            replicas.iter().filter(|r| r.role == role).map(|r| format!("http://{}", r.listen)).collect();
        urls.join(",")
    };

    let dir = std::env::temp_dir().join(format!("cc-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = TokenFile(dir.join("tokens"));
    std::fs::write(&tokens.0, TOKENS.join("\n")).unwrap();
    let cascade_args: Vec<String> = [
        "--services",
        "cascade",
        "--generator-endpoint",
        &endpoints(Role::Generator),
        "--ranker-endpoint",
        &endpoints(Role::Ranker),
        "--upstream-check-interval-ms",
        "200",
        "--upstream-timeout",
        &UPSTREAM_TIMEOUT_MS.to_string(),
        "--auth-token-file",
        tokens.0.to_str().unwrap(),
        "--fetch-allow",
        "127.0.0.1/32",
        "--max-open-streams",
        &MAX_OPEN_STREAMS.to_string(),
        "--stream-idle-timeout",
        &IDLE_TIMEOUT.as_secs().to_string(),
        "--max-stream-inflight",
        &STREAM_INFLIGHT.to_string(),
        "--max-message-bytes",
        &CASCADE_MESSAGE_BYTES.to_string(),
        "--image-cache-bytes",
        &CASCADE_IMAGE_CACHE.to_string(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let mut cascade = tier("127.0.0.1:0", &cascade_args).ready().await;
    // The cascade holds no model: what it holds is its callers' requests, each at most
    // --max-message-bytes, in up to six copies at once (the request as read and decoded, the
    // image, the Generate and Rank requests and their encodings), for every call the callers can
    // have in flight; its open streams (64 KB each, over three times what docs/security.md
    // measures); and its image cache.
    let calls = UNARY_CALLERS + (STREAM_CALLERS + HOSTILE_STREAMS_WITH_ITEMS) * STREAM_INFLIGHT as u64;
    let cascade_allowance_kb =
        (calls * 6 * CASCADE_MESSAGE_BYTES + MAX_OPEN_STREAMS as u64 * 65536 + CASCADE_IMAGE_CACHE) / 1024;
    memory.watch("cascade", cascade_allowance_kb, cascade.id());
    let ch = common::channel(cascade.addr()).await;
    // Both replicas of each role serving before anything is measured.
    for role in [Role::Generator, Role::Ranker] {
        let gauge = format!("caption_upstream_replicas{{service=\"{}\"}}", role.service());
        let start = Instant::now();
        while metric(cascade.metrics(), &gauge).await != Some(2.0) {
            assert!(start.elapsed() < Duration::from_secs(60), "{gauge} never reached 2");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // What each (scene, seed) gets before any chaos: every seeded answer must equal it.
    let mut references = HashMap::new();
    let mut client = CascadeClient::new(ch.clone());
    for (i, scene) in scenes.iter().enumerate() {
        for seed in 0..SEEDS {
            let req = caption_request(png_image(scene.clone()), params(Some(seed)));
            let answer = client.caption(authed(req, Some(TOKENS[0]), CALL_DEADLINE)).await.expect("a reference answer");
            references.insert((i, seed), answer.into_inner().candidates);
        }
    }
    let large = png(&image::RgbImage::from_fn(3000, 2000, |x, y| image::Rgb([(x / 8) as u8, (y / 6) as u8, 40])));
    let ctx = Arc::new(Ctx {
        cascade: cascade.addr(),
        metrics: cascade.metrics(),
        http,
        scenes,
        references,
        large,
        tally: Tally::new(),
        deadline: Instant::now() + Duration::from_secs(seconds),
    });

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (memory, done) = (memory.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                memory.sample("VmRSS:");
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // The open-streams gauge, sampled: it must never pass the cap.
    let gauge_peak = {
        let (ctx, done) = (ctx.clone(), done.clone());
        tokio::spawn(async move {
            let mut peak = 0f64;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(metric(ctx.metrics, "caption_open_streams ").await.unwrap_or(0.0));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    };
    let mut callers = Vec::new();
    for w in 0..UNARY_CALLERS {
        callers.push(tokio::spawn(unary_caller(ctx.clone(), w)));
    }
    for w in 0..STREAM_CALLERS {
        callers.push(tokio::spawn(stream_caller(ctx.clone(), w)));
    }
    callers.push(tokio::spawn(idle_caller(ctx.clone())));
    callers.push(tokio::spawn(malformed_caller(ctx.clone())));
    let chaos = tokio::spawn(chaos(ctx.clone(), std::mem::take(&mut replicas), memory.clone()));

    for caller in callers {
        if let Err(e) = caller.await {
            ctx.tally.violation(format!("a caller failed: {e}"));
        }
    }
    let (mut replicas, events) = chaos.await.expect("the chaos loop");
    // Every stream's place is given back once its callers are gone.
    let start = Instant::now();
    let mut open_at_end = metric(ctx.metrics, "caption_open_streams ").await;
    while open_at_end != Some(0.0) && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open_at_end = metric(ctx.metrics, "caption_open_streams ").await;
    }
    if open_at_end != Some(0.0) {
        ctx.tally.violation(format!("caption_open_streams is {open_at_end:?} with no stream open"));
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let gauge_peak = gauge_peak.await.unwrap();
    // The peak between samples, for the processes alive now.
    memory.sample("VmHWM:");
    memory.sample("VmRSS:");

    // Every process is up, and no log shows a secret or a raw control character.
    let mut all: Vec<(&str, &mut ServerProcess)> = vec![("cascade", &mut cascade)];
    for r in replicas.iter_mut() {
        all.push((&r.name, r.process.as_mut().unwrap()));
    }
    for (name, process) in all {
        if let Ok(Some(status)) = process.child().try_wait() {
            ctx.tally.violation(format!("{name} exited: {status}"));
        }
        let log = process.log();
        for secret in [URL_PASSWORD, WRONG_TOKEN, TOKENS[0], TOKENS[1]] {
            if log.contains(secret) {
                ctx.tally.violation(format!("{name}'s log shows {secret:?}"));
            }
        }
        if let Some(c) = log.chars().find(|c| c.is_control() && *c != '\n' && *c != '\t') {
            ctx.tally.violation(format!("{name}'s log holds the control character {c:?}"));
        }
    }

    let tally = &ctx.tally;
    println!("\nsoak of the split topology: {seconds} s, {UNARY_CALLERS} unary callers, {STREAM_CALLERS} stream callers, an idle-stream and a malformed-stream caller");
    println!("{:<48} {:<44} {:>7}", "case", "code", "count");
    for ((case, label), n) in tally.counts.lock().unwrap().iter() {
        println!("{case:<48} {label:<44} {n:>7}");
    }
    let total: u64 =
        tally.counts.lock().unwrap().iter().filter(|((_, l), _)| !l.starts_with("note:")).map(|(_, n)| n).sum();
    println!("{total} answers in all");
    for (case, (sent, answered)) in tally.items.lock().unwrap().iter() {
        println!("stream items, {case}: {sent} sent, {answered} answered");
    }
    println!("caption_open_streams: peak {gauge_peak} (cap {MAX_OPEN_STREAMS}), {open_at_end:?} at the end");
    println!(
        "{:<12} {:>6} {:>12} {:>12} {:>12} {:>12}",
        "process", "starts", "base kB", "peak kB", "bound kB", "end kB"
    );
    let mut over = Vec::new();
    for w in memory.0.lock().unwrap().iter() {
        // The lifetime with the least room under its bound.
        let life = w.lives.iter().min_by_key(|l| (l.base_kb + w.allowance_kb) as i64 - l.peak_kb as i64).unwrap();
        let bound = life.base_kb + w.allowance_kb;
        println!(
            "{:<12} {:>6} {:>12} {:>12} {:>12} {:>12}",
            w.name,
            w.lives.len(),
            life.base_kb,
            life.peak_kb,
            bound,
            w.lives.last().unwrap().last_kb
        );
        if life.peak_kb > bound {
            over.push(format!("{}: peak RSS {} kB over the bound {bound} kB", w.name, life.peak_kb));
        }
    }
    println!("chaos events ({}):", events.len());
    for e in &events {
        println!("  {e}");
    }
    if gauge_peak > MAX_OPEN_STREAMS as f64 {
        over.push(format!("{gauge_peak} streams open at once, over --max-open-streams {MAX_OPEN_STREAMS}"));
    }
    let violations = tally.violations.lock().unwrap().clone();
    assert!(violations.is_empty() && over.is_empty(), "{}", [violations, over].concat().join("\n"));
    assert!(seconds < 60 || !events.is_empty(), "no chaos event in {seconds} s");
}

/// What an open CaptionStream costs the server in memory: its VmRSS before and after opening
/// `STREAMS` (default 10,000) streams that send nothing but keep their request side open, and
/// after each has had one small item answered (the same scene, so the image cache serves every
/// decode), in KB per stream. The idle timeout is on (long enough not to fire), as by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "opens 10,000 streams; run with `cargo test --test soak -- --ignored --nocapture memory_per_open_stream`"]
async fn memory_per_open_stream() {
    let n: usize = std::env::var("STREAMS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    // Streams per connection: under the server's default --max-concurrent-streams (256).
    const PER_CONNECTION: usize = 250;
    let args = ["--max-open-streams", "20000", "--stream-idle-timeout", "3600", "--max-queue-size", "4096"];
    let server = common::server(&args).metrics().start().await;
    let (pid, metrics) = (server.id(), server.metrics());
    let scene = draw_scene(&mut StdRng::seed_from_u64(8)).png();
    let small = Some(pb::GenerationParams { num_candidates: Some(1), max_length: Some(4), ..Default::default() });
    let item = |id: String| pb::CaptionStreamRequest {
        id,
        request: Some(pb::CaptionRequest {
            top_k: Some(1),
            ..caption_request(png_image(scene.clone()), small.clone())
        }),
    };
    let open = |ch: Channel| async move {
        let (tx, rx) = mpsc::channel(1);
        let answers = CascadeClient::new(ch).caption_stream(ReceiverStream::new(rx)).await.expect("a stream opens");
        (tx, answers.into_inner())
    };
    let answer_one = |(tx, mut answers): (mpsc::Sender<pb::CaptionStreamRequest>, Answers), id: String| {
        let request = item(id);
        async move {
            tx.send(request).await.expect("the stream is open");
            let answer = answers.message().await.expect("an answer").expect("an answer");
            assert!(matches!(answer.result, Some(pb::caption_stream_response::Result::Response(_))), "{answer:?}");
            (tx, answers)
        }
    };
    // First use of every path a stream takes (the models' first batches, the image cache, the
    // stream machinery), so that what follows measures streams only.
    let ch = common::channel(server.addr()).await;
    for i in 0..16 {
        let stream = open(ch.clone()).await;
        drop(answer_one(stream, format!("warm-{i}")).await);
    }
    let open_gauge = || async { metric(metrics, "caption_open_streams ").await.unwrap_or(-1.0) };
    let settled = |want: usize| async move {
        let start = Instant::now();
        while open_gauge().await != want as f64 {
            assert!(start.elapsed() < Duration::from_secs(120), "caption_open_streams never reached {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        status_kb(pid, "VmRSS:").unwrap()
    };
    let before = settled(0).await;

    let mut channels = Vec::new();
    for _ in 0..n.div_ceil(PER_CONNECTION) {
        channels.push(Channel::from_shared(format!("http://{}", server.addr())).unwrap().connect().await.unwrap());
    }
    let start = Instant::now();
    let streams: Vec<_> = futures::stream::iter(0..n)
        .map(|i| open(channels[i / PER_CONNECTION].clone()))
        .buffer_unordered(256)
        .collect()
        .await;
    let opened_in = start.elapsed();
    let idle = settled(n).await;

    let start = Instant::now();
    let streams: Vec<_> = futures::stream::iter(streams.into_iter().enumerate())
        .map(|(i, stream)| answer_one(stream, i.to_string()))
        .buffer_unordered(64)
        .collect()
        .await;
    let answered_in = start.elapsed();
    let answered = settled(n).await;

    // VmRSS counts KiB; a KiB per stream is a MiB per 1024 streams.
    let per = |after: u64| (after as f64 - before as f64) / n as f64;
    println!(
        "\n{n} CaptionStreams on {} connections (opened in {opened_in:.1?}; one item each answered in {answered_in:.1?})",
        channels.len()
    );
    println!("server VmRSS: {before} KiB before, {idle} KiB with {n} open and idle, {answered} KiB once each had one item answered");
    println!("per open stream: {:.1} KiB idle, {:.1} KiB after one answered item", per(idle), per(answered));
    println!(
        "1024 open streams (the default --max-open-streams): {:.1} MiB idle, {:.1} MiB after one answered item",
        per(idle),
        per(answered)
    );
    assert_eq!(streams.len(), n);
    drop(streams);
}
