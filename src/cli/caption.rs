//! `caption-cascade caption`: the bulk job. Each argument (a file path or a URL) is captioned and
//! printed in the origin job's format, or as one JSON object per line with `--json`.

use std::{path::PathBuf, sync::Arc};

use clap::Args;
use serde_json::json;

use crate::{
    api::{convert, pb},
    cascade::{Cascade, ImageSource},
    config::EngineArgs,
    engine::Admission,
    models::generation::Strategy,
};

#[derive(Debug, Args)]
pub struct CaptionArgs {
    /// Image files or http(s) URLs to caption.
    #[arg(required = true, value_name = "IMAGE_OR_URL")]
    pub images: Vec<String>,
    /// Call a running server at this address (e.g. http://127.0.0.1:50051) instead of loading the models here.
    #[arg(long, env = "CAPTION_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Candidate captions BLIP writes per image.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub num_candidates: u32,
    /// Ranked captions printed per image.
    #[arg(long, short = 'k', default_value_t = 3)]
    pub top_k: u32,
    /// Decode greedily instead of sampling.
    #[arg(long, conflicts_with = "beams")]
    pub greedy: bool,
    /// Beam search with this many beams instead of sampling (candidates: the best beams).
    #[arg(long)]
    pub beams: Option<u32>,
    /// Start every caption from this text (e.g. "a picture of").
    #[arg(long)]
    pub prompt: Option<String>,
    /// Remove the prompt from the printed captions.
    #[arg(long, requires = "prompt")]
    pub strip_prompt: bool,
    /// Use the origin notebook's decoding settings (sampling, top_p 0.9, repetition penalty 1.1, min_length 10, max_length 80).
    #[arg(long)]
    pub notebook: bool,
    /// Seed of the sampler, for reproducible candidates.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object per image instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// One image's result, whichever way it was computed.
struct Outcome {
    key: String,
    /// As the server sends them, so both paths print from the same form.
    captions: Vec<pb::RankedCaption>,
    candidates: Vec<String>,
    total_ms: f64,
}

pub async fn run(args: CaptionArgs) -> anyhow::Result<()> {
    let mut failures = 0;
    let mut target = match &args.endpoint {
        Some(endpoint) => Target::Remote(
            pb::cascade_client::CascadeClient::connect(endpoint.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to {endpoint}: {e}"))?
                .max_decoding_message_size(crate::api::server::MAX_MESSAGE_BYTES),
        ),
        None => {
            let engine = args.engine.clone();
            Target::Local(tokio::task::spawn_blocking(move || crate::app::build_cascade(&engine)).await??)
        }
    };
    for name in &args.images {
        match caption_one(&mut target, &args, name).await {
            Ok(out) => print_outcome(&args, name, &out),
            Err(e) => {
                failures += 1;
                eprintln!("Image: {name}: error: {e}");
            }
        }
    }
    if let Target::Local(cascade) = target {
        let scheduler = cascade.models().scheduler.clone();
        tokio::task::spawn_blocking(move || scheduler.shutdown()).await?;
    }
    if failures > 0 {
        anyhow::bail!("{failures} of {} images failed", args.images.len());
    }
    Ok(())
}

enum Target {
    Local(Arc<Cascade>),
    Remote(pb::cascade_client::CascadeClient<tonic::transport::Channel>),
}

fn source_of(name: &str) -> anyhow::Result<ImageSource> {
    if name.starts_with("http://") || name.starts_with("https://") {
        return Ok(ImageSource::Url(name.to_string()));
    }
    let path = PathBuf::from(name);
    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(ImageSource::Bytes(bytes.into()))
}

async fn caption_one(target: &mut Target, args: &CaptionArgs, name: &str) -> anyhow::Result<Outcome> {
    let source = source_of(name)?;
    // One set of request parameters for both paths, converted in-process exactly as the server
    // converts them, so the two cannot drift.
    let params = request_params(args);
    match target {
        Target::Local(cascade) => {
            let params = convert::generation_params(
                Some(params),
                &cascade.default_params(),
                cascade.limits().generation.max_length,
            )
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
            let out = cascade.caption(source, params, args.top_k as usize, Admission::default()).await?;
            Ok(Outcome {
                key: out.key,
                captions: out.captions.into_iter().map(pb::RankedCaption::from).collect(),
                candidates: out.candidates,
                total_ms: out.timings.total.as_secs_f64() * 1e3,
            })
        }
        Target::Remote(client) => {
            let image = match source {
                ImageSource::Url(url) => pb::image::Source::Url(url),
                ImageSource::Bytes(data) => pb::image::Source::Data(Arc::unwrap_or_clone(data)),
            };
            let req = pb::CaptionRequest {
                image: Some(pb::Image { source: Some(image) }),
                params: Some(params),
                top_k: Some(args.top_k),
            };
            let out =
                client.caption(req).await.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?.into_inner();
            Ok(Outcome {
                key: out.key,
                captions: out.captions,
                candidates: out.candidates,
                total_ms: out.timings.map_or(0.0, |t| t.total_ms),
            })
        }
    }
}

/// The request's generation parameters as the command line sets them.
fn request_params(args: &CaptionArgs) -> pb::GenerationParams {
    pb::GenerationParams {
        num_candidates: Some(args.num_candidates),
        decoding: match strategy(args) {
            Strategy::Greedy => pb::Decoding::Greedy,
            Strategy::Sample => pb::Decoding::Sample,
            Strategy::Beam => pb::Decoding::Beam,
        } as i32,
        num_beams: args.beams,
        seed: Some(args.seed),
        prompt: args.prompt.clone(),
        strip_prompt: Some(args.strip_prompt),
        preset: if args.notebook { pb::Preset::Notebook } else { pb::Preset::Unspecified } as i32,
        ..Default::default()
    }
}

fn strategy(args: &CaptionArgs) -> Strategy {
    match (args.greedy, args.beams) {
        (true, _) => Strategy::Greedy,
        (false, Some(_)) => Strategy::Beam,
        (false, None) => Strategy::Sample,
    }
}

fn print_outcome(args: &CaptionArgs, name: &str, out: &Outcome) {
    if args.json {
        let captions: Vec<_> = out
            .captions
            .iter()
            .map(|c| json!({"text": c.text, "probability": c.probability, "cosine": c.cosine, "count": c.count}))
            .collect();
        let line = json!({
            "image": name,
            "key": out.key,
            "captions": captions,
            "candidates": out.candidates,
            "total_ms": out.total_ms,
        });
        println!("{line}");
        return;
    }
    println!("Image: {name}");
    // The origin job's header names the K asked for; identical candidates are merged into one
    // ranked caption (their probabilities summed), so fewer lines may follow.
    println!("\tTop {} captions ranked by CLIP:", args.top_k);
    for (i, c) in out.captions.iter().enumerate() {
        println!("\t\t{}: {}. (Caption probability: {:.2})", i + 1, c.text, c.probability);
    }
}
