//! Command-line and environment configuration of the engine and server, turned once into the
//! typed settings the layers below receive. Building the application from them is [`crate::app`]'s.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use ipnet::IpNet;

mod server;
mod units;

pub use server::{ServerArgs, Service};
pub use units::{Size, Span};

use crate::{
    backend::{CudaGraphs, DeviceChoice, Precision, Quantize},
    cascade::RequestLimits,
    engine::{QueueConfig, SchedulerConfig},
    images::{DecodeLimits, EgressPolicy, FetchLimits},
    validate::{CaptionLimits, GenerationLimits},
};

/// Models, device, batching and limits: everything needed to build the cascade in-process.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// BLIP checkpoint: a folder (Hugging Face layout: config.json, model.safetensors,
    /// tokenizer.json, preprocessor_config.json) or a hub id, e.g.
    /// Salesforce/blip-image-captioning-base[@REVISION], fetched into the hub cache on first use
    /// (HF_HUB_CACHE or HF_HOME; HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE=1 as the hub's own tools).
    /// The default, the embedded shapes model, is looked for in the working directory, then beside
    /// an installed binary (PREFIX/share/caption-cascade/models).
    #[arg(help_heading = "Models and device", long, env = "CAPTION_BLIP_MODEL", default_value = DEFAULT_BLIP, value_name = "DIR|HUB_ID")]
    pub blip_model: PathBuf,
    /// CLIP checkpoint: a folder or a hub id (e.g. openai/clip-vit-base-patch32), as --blip-model.
    #[arg(help_heading = "Models and device", long, env = "CAPTION_CLIP_MODEL", default_value = DEFAULT_CLIP, value_name = "DIR|HUB_ID")]
    pub clip_model: PathBuf,
    /// Device the models run on.
    #[arg(help_heading = "Models and device", long, env = "CAPTION_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Precision the models compute in: fp32 (the reference's numbers), bf16, fp16, or auto (bf16
    /// where the device computes it natively, else fp32; logged at start). docs/benchmark.md, Precision.
    #[arg(help_heading = "Models and device", long, env = "CAPTION_DTYPE", value_enum, default_value_t = Precision::Fp32)]
    pub dtype: Precision,
    /// int8: every linear layer of both models holds int8 weights and quantizes each input row on
    /// the fly (CPU with --dtype fp32 only). Faster on CPUs; captions move slightly:
    /// docs/benchmark.md, Precision, has both.
    #[arg(help_heading = "Models and device", long, env = "CAPTION_QUANTIZE", value_enum, default_value_t = Quantize::None)]
    pub quantize: Quantize,
    /// Replay BLIP's one-token decode steps from CUDA graphs, captured per executor when it
    /// starts: `pieces` (the bare flag) graphs the row-wise parts between attentions; `whole` each
    /// greedy or sampled step whole, over caches made once per executor for --generate-max-batch,
    /// --max-candidates and --max-length. CUDA only; --generate-max-batch x --max-candidates at
    /// most 512 rows. docs/benchmark.md.
    #[arg(help_heading = "Models and device", long, env = "CAPTION_CUDA_GRAPHS", value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "pieces", default_value = "off", value_name = "pieces|whole")]
    pub cuda_graphs: CudaGraphs,
    /// Executor threads that run model batches (each runs one batch at a time). Default: 1 for
    /// `serve`, whose one image then has every core (lowest latency); the `caption` bulk job on a
    /// CPU runs one per core with one thread each (highest throughput; docs/cli.md).
    #[arg(help_heading = "Batching", long, env = "CAPTION_EXECUTORS")]
    pub executors: Option<usize>,
    /// libtorch intra-op threads per executor on CPU; default: the cores divided among executors.
    #[arg(help_heading = "Batching", long, env = "CAPTION_INTRA_OP_THREADS")]
    pub intra_op_threads: Option<i32>,
    /// Largest number of images BLIP decodes together.
    #[arg(help_heading = "Batching", long, env = "CAPTION_GENERATE_MAX_BATCH", default_value_t = 8)]
    pub generate_max_batch: usize,
    /// Largest number of images CLIP ranks together.
    #[arg(help_heading = "Batching", long, env = "CAPTION_RANK_MAX_BATCH", default_value_t = 32)]
    pub rank_max_batch: usize,
    /// How long the oldest queued request waits for its batch to fill (a bare number: milliseconds).
    #[arg(help_heading = "Batching", long, env = "CAPTION_MAX_QUEUE_DELAY_MS", visible_alias = "max-queue-delay-ms", value_parser = units::millis, default_value_t = Span(Duration::from_millis(5)))]
    pub max_queue_delay: Span,
    /// Requests allowed to wait per model; beyond it calls fail fast with RESOURCE_EXHAUSTED.
    #[arg(help_heading = "Batching", long, env = "CAPTION_MAX_QUEUE_SIZE", default_value_t = 256)]
    pub max_queue_size: usize,
    /// Most candidate captions one request may ask for.
    #[arg(help_heading = "Request limits", long, env = "CAPTION_MAX_CANDIDATES", default_value_t = 32)]
    pub max_candidates: u32,
    /// Longest token sequence a request may ask for (also capped by the model's positions).
    #[arg(help_heading = "Request limits", long, env = "CAPTION_MAX_LENGTH", default_value_t = 80)]
    pub max_length: u32,
    /// Most captions one Rank request may carry.
    #[arg(help_heading = "Request limits", long, env = "CAPTION_MAX_CAPTIONS", default_value_t = 64)]
    pub max_captions: usize,
    /// Longest caption a Rank request may carry, in bytes.
    #[arg(help_heading = "Request limits", long, env = "CAPTION_MAX_CAPTION_BYTES", default_value_t = 1024)]
    pub max_caption_bytes: usize,
    /// Largest encoded image accepted, inline or fetched (bytes, or with a unit: 20MiB).
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_MAX_IMAGE_BYTES", value_parser = units::bytes, default_value_t = Size(20 << 20))]
    pub max_image_bytes: Size,
    /// Timeout of one image fetch, http(s) or file:// (a bare number: seconds).
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_FETCH_TIMEOUT_S", visible_alias = "fetch-timeout-s", value_parser = units::seconds, default_value_t = Span(Duration::from_secs(10)))]
    pub fetch_timeout: Span,
    /// Most pixels an image may have; larger ones are refused before decoding.
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_MAX_IMAGE_PIXELS", default_value_t = DecodeLimits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Most pixels per encoded byte an image above 4 Mpx may declare (bounds the decode work a small
    /// file can cause; even a blank RGB PNG uses under 300, only blank palette PNGs and GIFs go beyond).
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_MAX_IMAGE_PIXELS_PER_BYTE", default_value_t = DecodeLimits::default().max_pixels_per_byte)]
    pub max_image_pixels_per_byte: u64,
    /// Image decodes running at once in each of two lanes (images up to 4 Mpx, larger ones); a
    /// large one holds up to --max-image-pixels × 11 bytes. Default: the CPU count.
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_MAX_CONCURRENT_DECODES")]
    pub max_concurrent_decodes: Option<usize>,
    /// Bytes of model-ready images kept so repeated URLs are fetched once (a unit may follow:
    /// 256MiB; 0 disables); default: 2% of the memory limit (cgroup, else physical memory), at
    /// least 16 MiB.
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_IMAGE_CACHE_BYTES", value_parser = units::bytes)]
    pub image_cache_bytes: Option<Size>,
}

/// What a server lets its callers do, which the `caption` command does for its own user without
/// these bounds: how many calls at once, which files and addresses an image may come from.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Calls admitted at once (fetching, queued or computing); beyond it calls fail fast with RESOURCE_EXHAUSTED.
    #[arg(help_heading = "Request limits", long, env = "CAPTION_MAX_INFLIGHT", default_value_t = 1024)]
    pub max_inflight: usize,
    /// Directory whose files may be named by file:// URLs; file:// is refused without it.
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_ALLOW_FILE_DIR")]
    pub allow_file_dir: Option<PathBuf>,
    /// Let http(s) image fetches reach this CIDR (or single address) although the egress policy
    /// denies it by default, e.g. 127.0.0.1/32 for a sidecar. Repeatable or comma-separated. Beats
    /// --fetch-allow-private and the defaults, loses to --fetch-deny.
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_FETCH_ALLOW", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    pub fetch_allow: Vec<IpNet>,
    /// Keep http(s) image fetches away from this CIDR (or single address) on top of the defaults
    /// (loopback, private, link-local, metadata and other special ranges). Repeatable or
    /// comma-separated; beats every allow.
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_FETCH_DENY", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    pub fetch_deny: Vec<IpNet>,
    /// Let http(s) image fetches reach the private ranges 10/8, 172.16/12, 192.168/16 and fc00::/7
    /// (in-cluster stores); cloud metadata addresses in them stay denied.
    #[arg(help_heading = "Images and fetching", long, env = "CAPTION_FETCH_ALLOW_PRIVATE")]
    pub fetch_allow_private: bool,
}

/// The bounds [`PolicyArgs`] set, as the engine takes them.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_inflight: usize,
    pub allow_file_dir: Option<PathBuf>,
    pub egress: EgressPolicy,
}

impl PolicyArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            max_inflight: self.max_inflight,
            allow_file_dir: self.allow_file_dir.clone(),
            egress: EgressPolicy::new(self.fetch_allow.clone(), self.fetch_deny.clone(), self.fetch_allow_private),
        }
    }
}

impl Policy {
    /// The `caption` command's: its user can already read every file and reach every address
    /// this process can (the egress policy guards a server's network from its callers), and its
    /// `--concurrency` bounds its calls.
    pub fn bulk() -> Self {
        Self {
            max_inflight: tokio::sync::Semaphore::MAX_PERMITS,
            allow_file_dir: None,
            egress: EgressPolicy::unrestricted(),
        }
    }
}

const DEFAULT_BLIP: &str = "models/shapes-blip";
const DEFAULT_CLIP: &str = "models/shapes-clip";

/// Where `make install` puts the embedded models, relative to the installed binary's folder.
const INSTALLED_MODELS: &str = "../share/caption-cascade";

/// What a model flag names: a folder on this machine, or a checkpoint on the hub.
#[derive(Debug, PartialEq)]
enum ModelSource {
    Folder(PathBuf),
    Hub { repo_id: String, revision: String },
}

impl ModelSource {
    /// A folder that exists wins; the embedded defaults are looked for beside an installed binary
    /// and are never hub ids; anything else of the form `owner/name[@revision]` is a hub id (as
    /// the hub spells ids: letters, digits, `-`, `_`, `.`).
    fn of(given: &Path) -> ModelSource {
        if given.exists() {
            return ModelSource::Folder(given.to_path_buf());
        }
        if given == Path::new(DEFAULT_BLIP) || given == Path::new(DEFAULT_CLIP) {
            let installed = std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.join(INSTALLED_MODELS).join(given)))
                .filter(|folder| folder.is_dir());
            return ModelSource::Folder(installed.unwrap_or_else(|| given.to_path_buf()));
        }
        let text = given.to_string_lossy();
        let (id, revision) = text.split_once('@').unwrap_or((&text, "main"));
        let word = |w: &str| {
            !w.is_empty()
                && !w.starts_with('.')
                && w.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match id.split_once('/') {
            Some((owner, name)) if word(owner) && word(name) && !revision.is_empty() => {
                ModelSource::Hub { repo_id: id.to_string(), revision: revision.to_string() }
            }
            _ => ModelSource::Folder(given.to_path_buf()),
        }
    }
}

/// The folder to load the checkpoint `given` to `flag` names from: the folder itself, or the hub
/// cache's snapshot of a hub id (fetched now unless cached).
fn model_folder(given: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    match ModelSource::of(given) {
        ModelSource::Folder(folder) => Ok(folder),
        ModelSource::Hub { repo_id, revision } => {
            let offline =
                std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"));
            tracing::info!(%repo_id, %revision, offline, "fetching the checkpoint {flag} names from the hub");
            let req = crate::hub::PullRequest {
                repo_id: repo_id.clone(),
                revision,
                models_dir: PathBuf::new(),
                // As the hub's own tools: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
                cache_dir: std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()).map(PathBuf::from),
                endpoint: None,
                offline,
            };
            crate::hub::checkpoint(&req).map_err(|e| {
                anyhow::anyhow!("{flag} {repo_id}: {e} (or set {flag} to a checkpoint folder on this machine)")
            })
        }
    }
}

impl EngineArgs {
    /// The BLIP checkpoint folder to load (see [`ModelSource`]).
    pub fn blip_folder(&self) -> anyhow::Result<PathBuf> {
        model_folder(&self.blip_model, "--blip-model")
    }

    /// The CLIP checkpoint folder to load (see [`ModelSource`]).
    pub fn clip_folder(&self) -> anyhow::Result<PathBuf> {
        model_folder(&self.clip_model, "--clip-model")
    }

    /// How the models hold and compute their numbers on `device` (`--dtype`, `--quantize`,
    /// `--cuda-graphs`).
    pub fn numerics(&self, device: tch::Device) -> Result<crate::models::Numerics, String> {
        let numerics = self.quantize.numerics(device, self.dtype)?;
        // A decode step holds up to this many rows; graphs cover the steps only up to their
        // largest bucket, so a combination beyond it would run its fullest steps eagerly.
        let rows = self.generate_max_batch.max(1) as u64 * u64::from(self.max_candidates);
        let most = crate::models::graphs::MAX_ROWS as u64;
        if self.cuda_graphs != CudaGraphs::Off && rows > most {
            return Err(format!(
                "--cuda-graphs covers decode steps of up to {most} rows, and --generate-max-batch {} x \
                 --max-candidates {} allows {rows}: lower one of them",
                self.generate_max_batch, self.max_candidates
            ));
        }
        Ok(crate::models::Numerics {
            graphs: crate::backend::graph_mode(device, self.cuda_graphs)?,
            graph_rows: rows.min(most) as i64,
            whole_step: (self.cuda_graphs == CudaGraphs::Whole).then(|| crate::models::graphs::WholeStep {
                images: self.generate_max_batch.max(1) as i64,
                per_image: i64::from(self.max_candidates),
                positions: i64::from(self.max_length),
            }),
            ..numerics
        })
    }

    pub fn executors(&self) -> usize {
        self.executors.unwrap_or(1).max(1)
    }

    /// The bulk job's defaults: on a CPU, unless `--executors` says otherwise, one executor per
    /// core, so batches run side by side instead of splitting each product across the cores
    /// (measured on 2 cores: 5.4x instead of 3.1x the one-at-a-time rate with the embedded
    /// models, and 0.74 against 0.69 images/s with BLIP-base at concurrency 8).
    pub fn for_bulk(mut self) -> Self {
        if self.executors.is_none() && self.intra_op_threads.is_none() && self.device.resolve() == Ok(tch::Device::Cpu)
        {
            self.executors = Some(std::thread::available_parallelism().map_or(1, |n| n.get()));
        }
        self
    }

    pub fn scheduler_config(&self) -> SchedulerConfig {
        let delay = self.max_queue_delay.0;
        SchedulerConfig {
            executors: self.executors(),
            generate: QueueConfig {
                max_batch_size: self.generate_max_batch.max(1),
                max_queue_delay: delay,
                max_queue_size: self.max_queue_size,
            },
            rank: QueueConfig {
                max_batch_size: self.rank_max_batch.max(1),
                max_queue_delay: delay,
                max_queue_size: self.max_queue_size,
            },
        }
    }

    pub fn fetch_limits(&self, policy: &Policy) -> FetchLimits {
        FetchLimits {
            max_bytes: self.max_image_bytes.0,
            timeout: self.fetch_timeout.0,
            allow_file_dir: policy.allow_file_dir.clone(),
            egress: policy.egress.clone(),
        }
    }

    pub fn request_limits(&self, policy: &Policy) -> RequestLimits {
        RequestLimits {
            generation: GenerationLimits { max_candidates: self.max_candidates, max_length: self.max_length },
            captions: CaptionLimits { max_captions: self.max_captions, max_caption_bytes: self.max_caption_bytes },
            max_inflight: policy.max_inflight,
            decode: DecodeLimits {
                max_pixels: self.max_image_pixels,
                max_pixels_per_byte: self.max_image_pixels_per_byte,
                ..DecodeLimits::default()
            },
            max_concurrent_decodes: self
                .max_concurrent_decodes
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
                .max(1),
        }
    }

    pub fn image_cache_bytes(&self) -> u64 {
        self.image_cache_bytes.map_or_else(|| (memory_limit() / 50).max(16 << 20), |size| size.0)
    }

    pub fn intra_op_threads(&self, device: tch::Device) -> Option<i32> {
        if device != tch::Device::Cpu {
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some(self.intra_op_threads.unwrap_or_else(|| (cores / self.executors()).max(1) as i32))
    }
}

/// A CIDR, or a single address meaning just itself (an operator naming a sidecar writes its
/// address, not a /32).
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is neither a CIDR (e.g. 10.0.0.0/8, fd00::/8) nor an IP address"))
}

/// The memory this process may use: the cgroup v2 limit when one is set, else physical memory
/// (4 GiB when neither can be read).
fn memory_limit() -> u64 {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
    let physical = || {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kib = info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()?;
        Some(kib * 1024)
    };
    cgroup.or_else(physical).unwrap_or(4 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn whole_step_graphs_are_made_for_what_the_flags_allow() {
        use clap::Parser;
        let parse = |args: &[&str]| Cli::parse_from([&["test"], args].concat()).engine;
        let whole =
            parse(&["--cuda-graphs=whole", "--generate-max-batch", "4", "--max-candidates", "5", "--max-length", "30"]);
        assert_eq!(whole.cuda_graphs, CudaGraphs::Whole);
        assert_eq!(parse(&["--cuda-graphs"]).cuda_graphs, CudaGraphs::Pieces);
        assert_eq!(parse(&[]).cuda_graphs, CudaGraphs::Off);
        match whole.numerics(tch::Device::Cuda(0)) {
            Ok(n) => {
                let want = crate::models::graphs::WholeStep { images: 4, per_image: 5, positions: 30 };
                assert_eq!(n.whole_step, Some(want));
                assert_eq!(n.graph_rows, 20);
            }
            // A build without the CUDA shim refuses graphs; the limits never matter there.
            Err(e) => assert!(!cfg!(cuda_streams) && e.contains("no CUDA shim"), "{e}"),
        }
        let pieces = parse(&["--cuda-graphs=pieces"]).numerics(tch::Device::Cuda(0));
        assert!(pieces.map_or(true, |n| n.whole_step.is_none()));
    }

    #[test]
    fn a_model_flag_names_a_folder_or_a_hub_id() {
        let hub = |id: &str, rev: &str| ModelSource::Hub { repo_id: id.into(), revision: rev.into() };
        let folder = |p: &str| ModelSource::Folder(p.into());
        assert_eq!(
            ModelSource::of(Path::new("Salesforce/blip-image-captioning-base")),
            hub("Salesforce/blip-image-captioning-base", "main")
        );
        assert_eq!(
            ModelSource::of(Path::new("openai/clip-vit-base-patch32@v1.0")),
            hub("openai/clip-vit-base-patch32", "v1.0")
        );
        // An existing folder wins over the hub id it looks like.
        assert_eq!(ModelSource::of(Path::new("models/shapes-clip")), folder("models/shapes-clip"));
        assert_eq!(ModelSource::of(Path::new("src/config")), folder("src/config"));
        for path in ["./acme/model", "/abs/acme", "acme/model/sub", "acme", "acme/", "acme/model@", "a b/c", "../x"] {
            assert_eq!(ModelSource::of(Path::new(path)), folder(path), "{path}");
        }
    }
}
