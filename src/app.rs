//! Assembling the application from its settings, in one place for the server, the CLI, the
//! benchmark and the tests: models loaded on their device, the scheduler started over them, and
//! the captioner built around it; or, for a cascade tier, the chain over remote models.

use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    backend::{device, BlipRunner, ClipRunner},
    cascade::{Captioner, LocalModels, ResultCacheConfig},
    config::{EngineArgs, Policy},
    engine::{Scheduler, SystemClock},
    images::{Fetcher, ImageCache},
    models::Numerics,
    upstream::{AnswerBounds, CallLimits, RemoteChain, RemoteUpstreams},
    validate::Validator,
};

/// Which models a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSet {
    pub generator: bool,
    pub ranker: bool,
}

impl ModelSet {
    pub const BOTH: Self = Self { generator: true, ranker: true };
}

/// Loads both models from their folders and builds the captioner, serving its callers under
/// `policy`. Blocking: call it off the async runtime.
pub fn build_captioner(args: &EngineArgs, policy: &Policy) -> anyhow::Result<Arc<Captioner>> {
    build_captioner_with(args, policy, ModelSet::BOTH, ResultCacheConfig::OFF)
}

/// As [`build_captioner`], loading only the models in `models` and keeping Caption answers as
/// `results` says.
pub fn build_captioner_with(
    args: &EngineArgs,
    policy: &Policy,
    models: ModelSet,
    results: ResultCacheConfig,
) -> anyhow::Result<Arc<Captioner>> {
    let (blip, clip) = load_models(args, models)?;
    assemble_with(args, policy, blip, clip, results)
}

/// Where the models' weights come from.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// The checkpoint folders `args` names.
    Checkpoints,
    /// Random weights in the shapes of these config folders, with the tokenizers of the
    /// checkpoints `args` names: full-size models for the benchmark, computing as loaded ones do.
    Random { blip: PathBuf, clip: PathBuf },
}

/// Both models' runners, on the device and with the numerics `args` resolve to.
pub fn load_runners(args: &EngineArgs, source: &WeightSource) -> anyhow::Result<(BlipRunner, ClipRunner)> {
    match source {
        WeightSource::Checkpoints => {
            let (blip, clip) = load_models(args, ModelSet::BOTH)?;
            blip.zip(clip).ok_or_else(|| anyhow::anyhow!("both models were asked for"))
        }
        WeightSource::Random { blip, clip } => {
            let device = args.device.resolve().map_err(anyhow::Error::msg)?;
            let numerics = args.numerics(device).map_err(anyhow::Error::msg)?;
            let _no_grad = tch::no_grad_guard();
            let failed = |folder: &PathBuf, e| anyhow::anyhow!("cannot build a model of {}: {e}", folder.display());
            Ok((
                BlipRunner::random_as(blip, &args.blip_folder()?, device, numerics).map_err(|e| failed(blip, e))?,
                ClipRunner::random_as(clip, &args.clip_folder()?, device, numerics).map_err(|e| failed(clip, e))?,
            ))
        }
    }
}

/// The runners of the models in `models`, on the device and with the numerics `args` resolve to.
fn load_models(args: &EngineArgs, models: ModelSet) -> anyhow::Result<(Option<BlipRunner>, Option<ClipRunner>)> {
    let device = args.device.resolve().map_err(anyhow::Error::msg)?;
    tracing::info!(?device, generator = models.generator, ranker = models.ranker, "loading models");
    let numerics = args.numerics(device).map_err(anyhow::Error::msg)?;
    let blip = models.generator.then(|| load_blip(args, device, numerics)).transpose()?;
    let clip = models.ranker.then(|| load_clip(args, device, numerics)).transpose()?;
    Ok((blip, clip))
}

fn load_blip(args: &EngineArgs, device: tch::Device, numerics: Numerics) -> anyhow::Result<BlipRunner> {
    let folder = args.blip_folder()?;
    BlipRunner::load_as(&folder, device, numerics).map_err(|e| {
        anyhow::anyhow!(
            "cannot load the BLIP model from {}: {e} (set --blip-model or CAPTION_BLIP_MODEL to a BLIP checkpoint folder or hub id)",
            folder.display()
        )
    })
}

fn load_clip(args: &EngineArgs, device: tch::Device, numerics: Numerics) -> anyhow::Result<ClipRunner> {
    let folder = args.clip_folder()?;
    ClipRunner::load_as(&folder, device, numerics).map_err(|e| {
        anyhow::anyhow!(
            "cannot load the CLIP model from {}: {e} (set --clip-model or CAPTION_CLIP_MODEL to a CLIP checkpoint folder or hub id)",
            folder.display()
        )
    })
}

/// Starts the scheduler over loaded runners and builds the captioner around it.
pub fn assemble(
    args: &EngineArgs,
    policy: &Policy,
    blip: BlipRunner,
    clip: ClipRunner,
) -> anyhow::Result<Arc<Captioner>> {
    assemble_with(args, policy, Some(blip), Some(clip), ResultCacheConfig::OFF)
}

fn assemble_with(
    args: &EngineArgs,
    policy: &Policy,
    blip: Option<BlipRunner>,
    clip: Option<ClipRunner>,
    results: ResultCacheConfig,
) -> anyhow::Result<Arc<Captioner>> {
    let device = args.device.resolve().map_err(anyhow::Error::msg)?;
    let init = Arc::new(device::executor_init(device, args.intra_op_threads(device)));
    let (blip, clip) = (blip.map(Arc::new), clip.map(Arc::new));
    let scheduler =
        Scheduler::start_with(args.scheduler_config(), blip.clone(), clip.clone(), Arc::new(SystemClock), init);
    let fetcher = Fetcher::new(args.fetch_limits(policy)).map_err(anyhow::Error::msg)?;
    let cache = ImageCache::new(usize::try_from(args.image_cache_bytes()).unwrap_or(usize::MAX));
    let models = LocalModels { scheduler, blip, clip };
    Ok(Arc::new(Captioner::new(models, fetcher, cache, args.request_limits(policy)).with_result_cache(results)))
}

/// A cascade tier's chain over remote models: it serves its callers under `policy`, checks
/// requests and bounds its upstreams' answers by the same limit flags as the model tiers, and
/// gives each upstream call at most `upstream_timeout`.
pub fn build_chain(
    args: &EngineArgs,
    policy: &Policy,
    upstreams: RemoteUpstreams,
    results: ResultCacheConfig,
    upstream_timeout: Duration,
) -> anyhow::Result<Arc<RemoteChain>> {
    let fetcher = Fetcher::new(args.fetch_limits(policy)).map_err(anyhow::Error::msg)?;
    let limits = args.request_limits(policy);
    let answers = AnswerBounds::of(&limits.generation, &limits.captions);
    let upstreams = upstreams.with_limits(CallLimits { answers, timeout: upstream_timeout });
    let validator = Validator::new(limits.generation, limits.captions);
    Ok(Arc::new(RemoteChain::new(upstreams, fetcher, validator, policy.max_inflight).with_result_cache(results)))
}
