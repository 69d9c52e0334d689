//! Assembling the application from its settings, in one place for the server, the CLI, the
//! benchmark and the tests: models loaded on their device, the scheduler started over them, and
//! the cascade built around it.

use std::sync::Arc;

use crate::{
    backend::{device, BlipRunner, ClipRunner},
    cascade::{Cascade, LocalModels},
    config::EngineArgs,
    engine::{Scheduler, SystemClock},
    images::{Fetcher, ImageCache},
};

/// Loads both models from their folders and builds the cascade. Blocking: call it off the async
/// runtime.
pub fn build_cascade(args: &EngineArgs) -> anyhow::Result<Arc<Cascade>> {
    let (blip, clip) = load_runners(args)?;
    assemble(args, blip, clip)
}

/// Both models' runners, loaded from the folders `args` names onto its device.
pub fn load_runners(args: &EngineArgs) -> anyhow::Result<(BlipRunner, ClipRunner)> {
    let device = args.device.resolve().map_err(anyhow::Error::msg)?;
    tracing::info!(?device, "loading models");
    let blip = BlipRunner::load(&args.blip_model, device)
        .map_err(|e| anyhow::anyhow!("cannot load the BLIP model from {}: {e}", args.blip_model.display()))?;
    let clip = ClipRunner::load(&args.clip_model, device)
        .map_err(|e| anyhow::anyhow!("cannot load the CLIP model from {}: {e}", args.clip_model.display()))?;
    Ok((blip, clip))
}

/// Starts the scheduler over loaded runners and builds the cascade around it.
pub fn assemble(args: &EngineArgs, blip: BlipRunner, clip: ClipRunner) -> anyhow::Result<Arc<Cascade>> {
    let device = args.device.resolve().map_err(anyhow::Error::msg)?;
    let init = Arc::new(device::executor_init(device, args.intra_op_threads(device)));
    let (blip, clip) = (Arc::new(blip), Arc::new(clip));
    let scheduler =
        Scheduler::start_with(args.scheduler_config(), blip.clone(), clip.clone(), Arc::new(SystemClock), init);
    let fetcher = Fetcher::new(args.fetch_limits()).map_err(anyhow::Error::msg)?;
    let cache = ImageCache::new(usize::try_from(args.image_cache_bytes()).unwrap_or(usize::MAX));
    let models = LocalModels { scheduler, blip, clip };
    Ok(Arc::new(Cascade::new(models, fetcher, cache, args.request_limits())))
}
