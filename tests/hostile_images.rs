//! Images as a hostile caller sends them, against the real server process: each gets a clear
//! INVALID_ARGUMENT (or a normal answer) quickly, the process stays up and serving, its memory
//! stays inside the bound its flags set, and the image cache stays inside its byte budget.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use caption_cascade::{
    images::SMALL_IMAGE_PIXELS,
    pb::{self, cascade_client::CascadeClient, ranker_client::RankerClient},
};
use common::{channel, png_image, scenes::draw_scene, server, ServerProcess};
use image::{
    codecs::png::{CompressionType, FilterType, PngEncoder},
    ImageEncoder,
};
use rand::{rngs::StdRng, SeedableRng};
use sha2::{Digest, Sha256};
use tonic::{transport::Channel, Code};

/// The server's decode settings in this test; the memory bound below follows from them.
const DECODES: u64 = 2;
const MAX_PIXELS: u64 = 64 * 1024 * 1024;
const CACHE_BYTES: u64 = 200_000;

/// A GIF whose logical screen is 0 x 0 pixels.
const ZERO_GIF: &[u8] = b"GIF89a\x00\x00\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

struct Server {
    process: ServerProcess,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Server {
    async fn start() -> Self {
        let process = server(&["--max-concurrent-decodes", &DECODES.to_string()])
            .args(&["--max-image-pixels", &MAX_PIXELS.to_string(), "--image-cache-bytes", &CACHE_BYTES.to_string()])
            .metrics()
            .start()
            .await;
        Self { addr: process.addr(), metrics: process.metrics(), process }
    }

    fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id())).expect("server alive");
        let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in {status}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn assert_alive(&mut self) {
        assert!(self.process.child().try_wait().unwrap().is_none(), "the server process died");
    }
}

/// docs/api.md's bound on resident memory for this test's flags, over the RSS after start-up.
fn memory_bound_kb(base_kb: u64) -> u64 {
    base_kb + (DECODES * (MAX_PIXELS + SMALL_IMAGE_PIXELS) * 11 + CACHE_BYTES) / 1024
}

fn png_rgb(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            raw.extend_from_slice(&pixel(x, y));
        }
    }
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::NoFilter)
        .write_image(&raw, width, height, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 9) as u8, (y * 5) as u8, 77]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// A small valid JPEG whose frame header claims `width` × `height`, with a comment segment
/// carrying `tag` so each copy is distinct.
fn jpeg_claiming(width: u16, height: u16, tag: u32) -> Vec<u8> {
    let mut bytes = jpeg(16, 16);
    let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline frame header");
    bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    let comment = format!("copy {tag}");
    let mut segment = vec![0xFF, 0xFE];
    segment.extend_from_slice(&((comment.len() + 2) as u16).to_be_bytes());
    segment.extend_from_slice(comment.as_bytes());
    bytes.splice(2..2, segment);
    bytes
}

/// A PNG whose header claims `width` × `height` (CRC fixed up), with a one-pixel body.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = png_rgb(1, 1, |_, _| [1, 2, 3]);
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn caption_request(image: Option<pb::Image>) -> pb::CaptionRequest {
    let params = pb::GenerationParams { num_candidates: Some(2), max_length: Some(8), ..Default::default() };
    pb::CaptionRequest { image, params: Some(params), top_k: Some(1), ..Default::default() }
}

/// Sends one Caption call; returns its code, message and how long it took.
async fn caption(ch: &Channel, image: Option<pb::Image>) -> (Code, String, Duration) {
    let start = Instant::now();
    let result = CascadeClient::new(ch.clone()).caption(caption_request(image)).await;
    let took = start.elapsed();
    match result {
        Ok(_) => (Code::Ok, String::new(), took),
        Err(s) => (s.code(), s.message().to_string(), took),
    }
}

async fn expect(ch: &Channel, what: &str, image: Option<pb::Image>, code: Code, says: &str, within: Duration) {
    let (got, message, took) = caption(ch, image).await;
    eprintln!("{what}: {got:?} in {took:.2?}: {message}");
    assert_eq!(got, code, "{what}: {message}");
    assert!(message.contains(says), "{what}: {message:?} should say {says:?}");
    assert!(took <= within, "{what} took {took:?}, over {within:?}");
}

fn url_image(url: String) -> Option<pb::Image> {
    Some(pb::Image { source: Some(pb::image::Source::Url(url)) })
}

async fn scrape(addr: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_images_get_clear_errors_and_the_server_stays_up_inside_its_memory_bound() {
    let mut server = Server::start().await;
    let ch = channel(server.addr).await;
    let base_kb = server.status_kb("VmRSS:");
    let quick = Duration::from_secs(3);
    let inv = Code::InvalidArgument;

    // 1. A 1 x 60,000,000 PNG (about 200 KB): what CLIP sees of it is 224 columns of a centre
    //    crop; it must cost what its pixels cost, never the 13-billion-row resize.
    let sliver = png_rgb(1, 60_000_000, |_, _| [30, 90, 200]);
    eprintln!("1 x 60,000,000 PNG: {} bytes", sliver.len());
    // Two at once: the decode slots bound how many full-resolution images exist together. A
    // normal image sent meanwhile decodes in the small-image lane and is answered first.
    let normal = draw_scene(&mut StdRng::seed_from_u64(4)).png();
    // A trailing byte after the PNG's end: another digest, so a second decode, not a shared one.
    let other = [sliver.as_slice(), &[0]].concat();
    let delay = Duration::from_millis(200);
    let (a, b, n) = tokio::join!(caption(&ch, png_image(sliver.clone())), caption(&ch, png_image(other)), async {
        tokio::time::sleep(delay).await;
        caption(&ch, png_image(normal)).await
    });
    for (code, message, took) in [&a, &b] {
        eprintln!("1 x 60,000,000 PNG: {code:?} in {took:.2?} {message}");
        assert_eq!(*code, Code::Ok, "{message}");
        assert!(*took < Duration::from_secs(60), "took {took:?}");
    }
    eprintln!("normal scene sent {delay:?} later: {:?} in {:.2?}", n.0, n.2);
    assert_eq!(n.0, Code::Ok, "{}", n.1);
    assert!(delay + n.2 < a.2.min(b.2), "the normal call waited behind the large decodes");
    let (width, height) = (60_000_000u32, 1u32);
    let wide = png_rgb(width, height, |_, _| [200, 10, 10]);
    let (code, message, took) = caption(&ch, png_image(wide)).await;
    eprintln!("60,000,000 x 1 PNG: {code:?} in {took:.2?} {message}");
    assert_eq!(code, Code::Ok, "{message}");
    // A call that runs the models takes as long as a normal scene takes on this machine now, which
    // is seconds when every core is busy: such calls get `quick` on top of that, so that only the
    // image's own cost is bounded.
    let baseline = caption(&ch, png_image(draw_scene(&mut StdRng::seed_from_u64(12)).png())).await;
    assert_eq!(baseline.0, Code::Ok, "{}", baseline.1);
    eprintln!("a normal scene now: {:.2?}", baseline.2);
    let computed = quick + baseline.2;
    // A 1 x 100,000 PNG of a few hundred bytes.
    let thin = png_rgb(1, 100_000, |_, _| [200, 10, 10]);
    expect(&ch, "1 x 100,000 PNG", png_image(thin), Code::Ok, "", computed).await;

    // 2. Files that declare far more pixels than their bytes could hold.
    for tag in 0..16 {
        let bomb = jpeg_claiming(8000, 8000, tag);
        assert!(bomb.len() < 4096);
        expect(&ch, "2 KB JPEG claiming 8000 x 8000", png_image(bomb), inv, "--max-image-pixels-per-byte", quick).await;
    }
    expect(
        &ch,
        "PNG claiming 100000 x 100000",
        png_image(png_claiming(100_000, 100_000)),
        inv,
        "--max-image-pixels",
        quick,
    )
    .await;
    expect(&ch, "PNG claiming 4 x 2^31", png_image(png_claiming(4, 1 << 31)), inv, "", quick).await;

    // 3. Another caller's upload cannot be named by its digest.
    let private = draw_scene(&mut StdRng::seed_from_u64(3)).png();
    expect(&ch, "private upload", png_image(private.clone()), Code::Ok, "", computed).await;
    let digest = format!("sha256:{:x}", Sha256::digest(&private));
    expect(&ch, "digest as url", url_image(digest.clone()), inv, "not supported", quick).await;
    let rank = RankerClient::new(ch.clone())
        .rank(pb::RankRequest { image: url_image(digest), captions: vec!["a".into(), "b".into()] })
        .await;
    assert_eq!(rank.unwrap_err().code(), inv);

    // 4. Degenerate and broken files.
    expect(&ch, "0 x 0 GIF", png_image(ZERO_GIF.to_vec()), inv, "", quick).await;
    let real_jpeg = jpeg(64, 48);
    expect(&ch, "truncated JPEG", png_image(real_jpeg[..real_jpeg.len() / 2].to_vec()), inv, "", quick).await;
    let real_png = png_rgb(64, 48, |x, y| [x as u8, y as u8, 3]);
    expect(&ch, "truncated PNG", png_image(real_png[..real_png.len() / 2].to_vec()), inv, "", quick).await;
    expect(&ch, "garbage", png_image(b"\x89PNG but not really".to_vec()), inv, "", quick).await;
    expect(&ch, "JPEG magic only", png_image(vec![0xFF, 0xD8, 0xFF]), inv, "", quick).await;
    expect(&ch, "empty", png_image(Vec::new()), inv, "empty", quick).await;

    // 5. Many distinct large images: the cache keeps model-ready pixels within its byte budget.
    for i in 0..12u32 {
        let big = png_rgb(2000, 1500, |x, y| [(x / 8 + i) as u8, (y / 6) as u8, (i * 20) as u8]);
        expect(&ch, "distinct 3 Mpx PNG", png_image(big), Code::Ok, "", Duration::from_secs(20)).await;
    }
    let cached = scrape(server.metrics, "caption_image_cache_bytes").await;
    let evictions = scrape(server.metrics, "caption_image_cache_evictions_total").await;
    eprintln!("image cache: {cached} bytes, {evictions} evictions");
    assert!(cached > 0.0 && cached <= CACHE_BYTES as f64, "cache holds {cached} bytes");
    assert!(evictions > 0.0, "the byte budget never evicted");

    // The server is up, serving, and still captions a normal scene right.
    server.assert_alive();
    let scene = draw_scene(&mut StdRng::seed_from_u64(11));
    let params =
        pb::GenerationParams { decoding: pb::Decoding::Greedy as i32, num_candidates: Some(1), ..Default::default() };
    let resp = CascadeClient::new(channel(server.addr).await)
        .caption(pb::CaptionRequest {
            image: png_image(scene.png()),
            params: Some(params),
            top_k: Some(1),
            ..Default::default()
        })
        .await
        .expect("a normal call after the hostile ones")
        .into_inner();
    assert_eq!(resp.captions[0].text, scene.caption);

    // Peak memory: the models plus at most DECODES full-resolution decodes in each lane (11 bytes
    // per pixel: the widest decoded form, 16-bit RGBA, and its RGB copy) plus the cache.
    let peak_kb = server.status_kb("VmHWM:");
    let bound_kb = memory_bound_kb(base_kb);
    eprintln!("server RSS: {base_kb} kB after start, peak {peak_kb} kB, bound {bound_kb} kB");
    assert!(peak_kb <= bound_kb, "peak RSS {peak_kb} kB over the bound {bound_kb} kB");
}

/// One kind of soak call: its image (`None`: a fresh scene each time), the code it must get and
/// how often it is drawn.
struct SoakCase {
    what: &'static str,
    image: Option<Option<pb::Image>>,
    code: Code,
    weight: u32,
}

/// Mixed hostile and normal traffic for `SOAK_SECONDS` (default 600) from 8 concurrent callers,
/// sampling the server's RSS every 200 ms: it never crashes, every normal call succeeds, every
/// hostile one gets its expected code, and RSS stays under the same bound as above.
/// `make soak` runs it; it is too long for every test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "ten minutes; run with `make soak`"]
async fn soak_mixed_hostile_and_normal_traffic() {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    };
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let mut server = Server::start().await;
    let ch = channel(server.addr).await;
    let base_kb = server.status_kb("VmRSS:");
    let bound_kb = memory_bound_kb(base_kb);

    let sliver = png_rgb(1, 60_000_000, |_, _| [30, 90, 200]);
    let big = png_rgb(3000, 2000, |x, y| [(x / 8) as u8, (y / 6) as u8, 40]);
    let private = draw_scene(&mut StdRng::seed_from_u64(5)).png();
    let digest = format!("sha256:{:x}", Sha256::digest(&private));
    let real_jpeg = jpeg(64, 48);
    let cases: Vec<(&str, _, _, _)> = vec![
        ("normal scene", None, Code::Ok, 40),
        ("1 x 60,000,000 PNG", Some(png_image(sliver)), Code::Ok, 2),
        ("3000 x 2000 PNG", Some(png_image(big)), Code::Ok, 6),
        ("1 x 100,000 PNG", Some(png_image(png_rgb(1, 100_000, |_, _| [200, 10, 10]))), Code::Ok, 6),
        ("JPEG claiming 8000 x 8000", Some(png_image(jpeg_claiming(8000, 8000, 1))), Code::InvalidArgument, 10),
        ("PNG claiming 100000 x 100000", Some(png_image(png_claiming(100_000, 100_000))), Code::InvalidArgument, 6),
        ("truncated JPEG", Some(png_image(real_jpeg[..real_jpeg.len() / 2].to_vec())), Code::InvalidArgument, 6),
        ("0 x 0 GIF", Some(png_image(ZERO_GIF.to_vec())), Code::InvalidArgument, 6),
        ("digest as url", Some(url_image(digest)), Code::InvalidArgument, 6),
        ("garbage", Some(png_image(b"garbage".to_vec())), Code::InvalidArgument, 6),
    ];
    let cases: Arc<Vec<SoakCase>> =
        Arc::new(cases.into_iter().map(|(what, image, code, weight)| SoakCase { what, image, code, weight }).collect());
    let total_weight: u32 = cases.iter().map(|c| c.weight).sum();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let pid = server.process.id();
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    let kb = status
                        .lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                        .unwrap_or(0);
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let (ch, cases) = (ch.clone(), cases.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(1000 + w);
            let mut counts: std::collections::BTreeMap<(&str, String), u64> = Default::default();
            while Instant::now() < deadline {
                // A case drawn with probability proportional to its weight.
                let mut pick = rand::Rng::random_range(&mut rng, 0..total_weight);
                let case = cases
                    .iter()
                    .find(|c| {
                        if pick < c.weight {
                            return true;
                        }
                        pick -= c.weight;
                        false
                    })
                    .unwrap();
                let mut image = case.image.clone().unwrap_or_else(|| png_image(draw_scene(&mut rng).png()));
                // Bytes after the end of a good PNG or JPEG are ignored by decoders but change the
                // digest, so every call decodes afresh instead of hitting the image cache. (Not
                // on broken files: after a truncated JPEG they would be read as its data.)
                if let (Code::Ok, Some(pb::Image { source: Some(pb::image::Source::Data(bytes)) })) =
                    (case.code, &mut image)
                {
                    bytes.extend_from_slice(&rand::Rng::random::<u64>(&mut rng).to_le_bytes());
                }
                let (code, message, _) = caption(&ch, image).await;
                assert_eq!(code, case.code, "{}: {message}", case.what);
                *counts.entry((case.what, format!("{code:?}"))).or_default() += 1;
            }
            counts
        }));
    }
    let mut totals: std::collections::BTreeMap<(&str, String), u64> = Default::default();
    for w in workers {
        for (k, n) in w.await.expect("a caller saw an unexpected answer") {
            *totals.entry(k).or_default() += n;
        }
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    server.assert_alive();
    let peak_kb = peak.load(Ordering::Relaxed).max(server.status_kb("VmHWM:"));
    for ((what, code), n) in &totals {
        eprintln!("{n:>7}  {what}: {code}");
    }
    eprintln!("{seconds} s: server RSS {base_kb} kB after start, peak {peak_kb} kB, bound {bound_kb} kB");
    assert!(peak_kb <= bound_kb, "peak RSS {peak_kb} kB over the bound {bound_kb} kB");
}
