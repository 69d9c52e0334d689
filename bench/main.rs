//! Throughput and latency of the Cascade service against client concurrency.
//!
//! Starts the real server in-process on 127.0.0.1:0 and drives `Cascade.Caption` over gRPC from
//! C concurrent clients for a fixed time per level, with a fixed decode length (min_length =
//! max_length) so every level does the same work per image. Prints a table and, with --json,
//! writes one JSON object per level.
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
    /// Write one JSON object per level to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Load a running server at this address (HOST:PORT, e.g. a split deployment's cascade)
    /// instead of serving the models in this process.
    #[arg(long)]
    endpoint: Option<SocketAddr>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug)]
struct Level {
    concurrency: usize,
    requests: usize,
    errors: usize,
    seconds: f64,
    latencies_ms: Vec<f64>,
    /// The process's peak resident memory by the end of this level (server and clients).
    peak_rss_mb: f64,
}

impl Level {
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
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

fn build_runners(e: &EngineArgs, models: Models) -> anyhow::Result<(BlipRunner, ClipRunner)> {
    let source = match models {
        Models::Checkpoints => WeightSource::Checkpoints,
        Models::Base => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/configs");
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
        "{:>11} {:>9} {:>8} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "concurrency", "requests", "errors", "images/s", "p50 ms", "p90 ms", "p99 ms", "peak MB"
    );
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let level = drive(addr, &images, c, Duration::from_secs_f64(args.seconds), &args).await?;
        println!(
            "{:>11} {:>9} {:>8} {:>11.2} {:>9.1} {:>9.1} {:>9.1} {:>9.0}",
            c,
            level.requests,
            level.errors,
            level.throughput(),
            level.percentile(0.5),
            level.percentile(0.9),
            level.percentile(0.99),
            level.peak_rss_mb
        );
        levels.push(level);
    }
    if let (Some(first), Some(best)) =
        (levels.first(), levels.iter().max_by(|a, b| a.throughput().total_cmp(&b.throughput())))
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
                    "concurrency": l.concurrency, "requests": l.requests, "errors": l.errors,
                    "images_per_s": l.throughput(), "p50_ms": l.percentile(0.5), "p90_ms": l.percentile(0.9),
                    "p99_ms": l.percentile(0.99), "candidates": args.candidates, "decode_len": args.decode_len,
                    "peak_rss_mb": l.peak_rss_mb, "dtype": format!("{:?}", engine.dtype), "quantize": format!("{:?}", engine.quantize),
                })
                .to_string()
            })
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    Ok(())
}

/// The example images as bytes; clients take them in turn.
fn sample_images() -> anyhow::Result<Arc<Vec<Vec<u8>>>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/images");
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
                let (mut latencies, mut errors, mut n) = (Vec::new(), 0usize, i);
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
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    let mut errors = 0;
    for c in clients {
        let (l, e) = c.await?;
        latencies_ms.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Level { concurrency, requests: latencies_ms.len(), errors, seconds, latencies_ms, peak_rss_mb: peak_rss_mb() })
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
