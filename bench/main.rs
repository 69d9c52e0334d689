//! Throughput and latency of the Cascade service against client concurrency.
//!
//! Starts the real server in-process on 127.0.0.1:0 and drives `Cascade.Caption` over gRPC from
//! C concurrent clients for a fixed time per level, with a fixed decode length (min_length =
//! max_length) so every level does the same work per image. Prints a table and, with --json,
//! writes one JSON object per level.
//!
//! `--arrival-rate R` measures one open-loop level instead: a request starts every 1/R seconds
//! whatever the server's progress, each with a decode length of its own (half to one and a half
//! times `--decode-len`, ending early at the end token after half of it), so requests join and
//! leave running decode batches mid-decode and rows of one image end at different steps.
//!
//! `--models checkpoints` serves the folders `--blip-model` / `--clip-model` name (by default the
//! shipped shapes models; `make bench` points them at full-size weights it saved once for both
//! sides); `--models base` builds full-size BLIP-base and CLIP ViT-B/32 from `bench/configs/` with
//! random weights made in memory (their tokenizers are the shapes ones: token ids beyond them
//! decode to nothing, which only shortens the texts CLIP embeds).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use caption_cascade::{
    app::WeightSource,
    backend::{BlipRunner, ClipRunner},
    config::EngineArgs,
    models::timing::StepTimes,
    pb::{self, cascade_client::CascadeClient},
};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Models {
    /// The checkpoint folders --blip-model and --clip-model name (default: the shipped shapes models).
    #[value(alias = "embedded")]
    Checkpoints,
    /// Full-size BLIP-base and CLIP ViT-B/32 shapes with random weights.
    Base,
}

/// Cascade throughput and latency percentiles against concurrency.
#[derive(Debug, Parser)]
struct Args {
    /// Which models to serve.
    #[arg(long, value_enum, default_value_t = Models::Checkpoints)]
    models: Models,
    /// Concurrency levels to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    concurrency: Vec<usize>,
    /// Seconds of load per level (after a short warm-up).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Candidate captions per image.
    #[arg(long, default_value_t = 10)]
    candidates: u32,
    /// Fixed sequence length of every candidate (start token included).
    #[arg(long, default_value_t = 20)]
    decode_len: u32,
    /// Instead of the concurrency levels, one open-loop level: requests arrive at this rate (per
    /// second) for --seconds, with staggered decode lengths; the level ends when all are answered.
    #[arg(long)]
    arrival_rate: Option<f64>,
    /// Write one JSON object per level to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Load a running server at this address (HOST:PORT, e.g. a split deployment's cascade)
    /// instead of serving the models in this process.
    #[arg(long)]
    endpoint: Option<SocketAddr>,
    /// Instead of a load: write the first decode step's next-token logits of --blip-model for
    /// fixed pixels (seeded on the CPU, so every device sees the same input) to this JSON file,
    /// for `bench/compare.py check-logits` to compare across devices and precisions.
    #[arg(long)]
    first_step_logits: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug)]
struct Level {
    /// Concurrent clients, or 0 for the open-loop level.
    concurrency: usize,
    requests: usize,
    errors: usize,
    /// The first failed request's status, so a run that failed says why.
    first_error: Option<String>,
    seconds: f64,
    latencies_ms: Vec<f64>,
    /// The process's peak resident memory by the end of this level (server and clients).
    peak_rss_mb: f64,
    /// The decode steps this level ran in this process (none when loading an --endpoint).
    steps: StepTimes,
}

/// When a level started, by the wall clock and by this process's decode-step counters.
struct Since {
    start: Instant,
    steps: StepTimes,
}

impl Level {
    /// A level that ends now, with what its requests measured.
    fn ended(
        concurrency: usize,
        mut latencies_ms: Vec<f64>,
        errors: usize,
        first_error: Option<String>,
        since: Since,
    ) -> Level {
        latencies_ms.sort_by(f64::total_cmp);
        Level {
            concurrency,
            requests: latencies_ms.len(),
            errors,
            first_error,
            seconds: since.start.elapsed().as_secs_f64(),
            latencies_ms,
            peak_rss_mb: peak_rss_mb(),
            steps: StepTimes::now().since(&since.steps),
        }
    }

    fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_ms.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_ms[i]
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.first_step_logits {
        return first_step_logits(&args.engine, path);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

fn build_runners(e: &EngineArgs, models: Models) -> anyhow::Result<(BlipRunner, ClipRunner)> {
    let source = match models {
        Models::Checkpoints => WeightSource::Checkpoints,
        Models::Base => {
            let root = repo_path("bench/configs");
            WeightSource::Random { blip: root.join("blip-base"), clip: root.join("clip-vit-base-patch32") }
        }
    };
    caption_cascade::app::load_runners(e, &source)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let engine = args.engine.clone();
    let models = args.models;
    let addr = match args.endpoint {
        Some(addr) => addr,
        None => {
            let (blip, clip) = {
                let engine = engine.clone();
                tokio::task::spawn_blocking(move || build_runners(&engine, models)).await??
            };
            let cascade =
                caption_cascade::app::assemble(&engine, &caption_cascade::config::Policy::bulk(), blip, clip)?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            tokio::spawn(caption_cascade::api::serve(listener, cascade, Default::default(), std::future::pending()));
            addr
        }
    };
    let images = sample_images()?;
    let device = engine.device.resolve().map_err(anyhow::Error::msg)?;
    println!(
        "# models={:?} device={device:?} dtype={:?} quantize={:?} executors={} generate_max_batch={} candidates={} decode_len={} seconds/level={}",
        args.models, engine.dtype, engine.quantize, engine.executors(), engine.generate_max_batch, args.candidates, args.decode_len, args.seconds
    );
    // Warm-up: first calls pay for lazy initialisation (allocator, kernels).
    drive(addr, &images, 2, Duration::from_secs_f64(args.seconds.min(3.0)), &args).await?;
    println!(
        "{:>11} {:>9} {:>8} {:>11} {:>9} {:>9} {:>9} {:>9} {:>8} {:>11} {:>11}",
        if args.arrival_rate.is_some() { "arrivals" } else { "concurrency" },
        "requests",
        "errors",
        "images/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "peak MB",
        "steps",
        "host ms/st",
        "wait ms/st"
    );
    let mut levels = Vec::new();
    let plan: Vec<Option<usize>> = match args.arrival_rate {
        Some(_) => vec![None],
        None => args.concurrency.iter().map(|&c| Some(c)).collect(),
    };
    for c in plan {
        let length = Duration::from_secs_f64(args.seconds);
        let level = match (c, args.arrival_rate) {
            (Some(c), _) => drive(addr, &images, c, length, &args).await?,
            (None, Some(rate)) => open_loop(addr, &images, rate, length, &args).await?,
            (None, None) => unreachable!("a level is either closed or open loop"),
        };
        let c = c.map_or_else(|| format!("open@{}/s", args.arrival_rate.unwrap_or_default()), |c| c.to_string());
        println!(
            "{:>11} {:>9} {:>8} {:>11.2} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>8} {:>11.3} {:>11.3}",
            c,
            level.requests,
            level.errors,
            level.throughput(),
            level.percentile(0.5),
            level.percentile(0.9),
            level.percentile(0.99),
            level.peak_rss_mb,
            level.steps.steps,
            level.steps.host_ms_per_step(),
            level.steps.device_wait_ms_per_step()
        );
        levels.push(level);
    }
    if let (None, Some(first), Some(best)) =
        (args.arrival_rate, levels.first(), levels.iter().max_by(|a, b| a.throughput().total_cmp(&b.throughput())))
    {
        println!(
            "# batching gain: {:.2}x ({:.2} images/s at concurrency {} / {:.2} at concurrency {})",
            best.throughput() / first.throughput(),
            best.throughput(),
            best.concurrency,
            first.throughput(),
            first.concurrency
        );
    }
    if let Some(path) = &args.json {
        let lines: Vec<String> = levels
            .iter()
            .map(|l| {
                serde_json::json!({
                    "models": format!("{:?}", args.models), "device": format!("{device:?}"),
                    "concurrency": l.concurrency, "arrival_rate": args.arrival_rate, "requests": l.requests, "errors": l.errors, "first_error": l.first_error,
                    "images_per_s": l.throughput(), "p50_ms": l.percentile(0.5), "p90_ms": l.percentile(0.9),
                    "p99_ms": l.percentile(0.99), "candidates": args.candidates, "decode_len": args.decode_len,
                    "peak_rss_mb": l.peak_rss_mb, "dtype": format!("{:?}", engine.dtype), "quantize": format!("{:?}", engine.quantize),
                    "decode_steps": l.steps.steps, "host_ms_per_step": finite(l.steps.host_ms_per_step()),
                    "device_wait_ms_per_step": finite(l.steps.device_wait_ms_per_step()),
                    "whole_steps": l.steps.whole, "cuda_graphs": format!("{:?}", engine.cuda_graphs),
                })
                .to_string()
            })
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    Ok(())
}

/// The first decode step's next-token logits (fp32 numbers) of --blip-model on the engine's
/// device and precision, for two images of seeded random pixels, as JSON.
fn first_step_logits(engine: &EngineArgs, path: &Path) -> anyhow::Result<()> {
    use caption_cascade::models::blip::{Blip, SelfAttnCache};
    use tch::{Kind, Tensor};

    let _g = tch::no_grad_guard();
    let device = engine.device.resolve().map_err(anyhow::Error::msg)?;
    let numerics = engine.numerics(device).map_err(anyhow::Error::msg)?;
    let blip = Blip::load_as(&engine.blip_folder()?, device, numerics)?;
    let size = blip.config.vision_config.image_size;
    tch::manual_seed(1);
    let pixels = Tensor::randn([2, 3, size, size], (Kind::Float, tch::Device::Cpu));
    let embeds = blip.encode_image(&pixels.to_device(device).to_kind(blip.kind()));
    let cross = blip.text_decoder.cross_attn_cache(&embeds);
    let bos = blip.config.text_config.bos_token_id;
    let ids = Tensor::from_slice(&[bos, bos]).view([2, 1]).to_device(device);
    let hidden = blip.text_decoder.forward(&ids, &mut SelfAttnCache::default(), &cross, &[1, 1], None);
    let logits = blip.text_decoder.next_token_logits(&hidden).to_kind(Kind::Float).to_device(tch::Device::Cpu);
    let rows: Vec<Vec<f32>> =
        (0..2).map(|i| Vec::<f32>::try_from(logits.get(i)).map_err(anyhow::Error::from)).collect::<Result<_, _>>()?;
    let json = serde_json::json!({
        "device": format!("{device:?}"), "dtype": format!("{:?}", engine.dtype), "logits": rows,
    });
    std::fs::write(path, json.to_string())?;
    Ok(())
}

/// `relative` in the working directory when it is there (a binary carried to another machine runs
/// from a checkout at another path), else in the checkout this binary was built from.
fn repo_path(relative: &str) -> PathBuf {
    let here = PathBuf::from(relative);
    if here.exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The example images as bytes; clients take them in turn.
fn sample_images() -> anyhow::Result<Arc<Vec<Vec<u8>>>> {
    let dir = repo_path("examples/images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no images in {}", dir.display());
    Ok(Arc::new(files.iter().map(std::fs::read).collect::<Result<_, _>>()?))
}

async fn drive(
    addr: SocketAddr,
    images: &Arc<Vec<Vec<u8>>>,
    concurrency: usize,
    length: Duration,
    args: &Args,
) -> anyhow::Result<Level> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let start = Instant::now();
    let steps_before = StepTimes::now();
    let deadline = start + length;
    let params = pb::GenerationParams {
        num_candidates: Some(args.candidates),
        max_length: Some(args.decode_len),
        min_length: Some(args.decode_len),
        ..Default::default()
    };
    let clients: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut client = CascadeClient::new(channel.clone());
            let images = images.clone();
            let params = params.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut first_error, mut n) = (Vec::new(), 0usize, None, i);
                while Instant::now() < deadline {
                    let req = pb::CaptionRequest {
                        image: Some(pb::Image {
                            source: Some(pb::image::Source::Data(images[n % images.len()].clone())),
                        }),
                        params: Some(pb::GenerationParams { seed: Some(n as u64), ..params.clone() }),
                        top_k: Some(3),
                        ..Default::default()
                    };
                    n += concurrency;
                    let t = Instant::now();
                    match client.caption(req).await {
                        Ok(_) => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(status) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for c in clients {
        let (l, e, f) = c.await?;
        latencies_ms.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    Ok(Level::ended(concurrency, latencies_ms, errors, first_error, Since { start, steps: steps_before }))
}

/// `x`, or JSON's null where it is not a number (no steps ran in this process).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The parameters of open-loop request `n`: a decode length of its own between half and one and a
/// half times `--decode-len` (spread by a multiplicative hash, so neighbours differ), which rows
/// may end early at the end token once past half of it, and sampling, so each candidate ends
/// when its own draws say.
fn staggered_params(n: u64, decode_len: u32, candidates: u32) -> pb::GenerationParams {
    let lo = (decode_len / 2).max(2);
    let span = u64::from(decode_len + 1);
    let max_length = lo + (n.wrapping_mul(2_654_435_761) % span) as u32;
    pb::GenerationParams {
        num_candidates: Some(candidates),
        max_length: Some(max_length),
        min_length: Some(max_length / 2),
        seed: Some(n),
        ..Default::default()
    }
}

/// One open-loop level: a request every `1 / rate` seconds for `length`, each on its own task, so
/// arrivals never wait for answers; returns once every request is answered.
async fn open_loop(
    addr: SocketAddr,
    images: &Arc<Vec<Vec<u8>>>,
    rate: f64,
    length: Duration,
    args: &Args,
) -> anyhow::Result<Level> {
    anyhow::ensure!(rate.is_finite() && rate > 0.0, "--arrival-rate must be a positive number");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let start = Instant::now();
    let steps_before = StepTimes::now();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    let mut n = 0u64;
    while start.elapsed() < length {
        ticks.tick().await;
        let mut client = CascadeClient::new(channel.clone());
        let req = pb::CaptionRequest {
            image: Some(pb::Image { source: Some(pb::image::Source::Data(images[n as usize % images.len()].clone())) }),
            params: Some(staggered_params(n, args.decode_len, args.candidates)),
            top_k: Some(3),
            ..Default::default()
        };
        n += 1;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            client.caption(req).await.map(|_| t.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let (mut latencies_ms, mut errors, mut first_error) = (Vec::new(), 0, None);
    for t in tasks {
        match t.await? {
            Ok(ms) => latencies_ms.push(ms),
            Err(status) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
    Ok(Level::ended(0, latencies_ms, errors, first_error, Since { start, steps: steps_before }))
}

/// Peak resident set size of this process so far, in MB (`VmHWM`).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
