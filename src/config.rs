//! Command-line and environment configuration of the engine and server, turned once into the
//! typed settings the layers below receive. Building the application from them is [`crate::app`]'s.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use crate::{
    backend::DeviceChoice,
    cascade::RequestLimits,
    engine::{QueueConfig, SchedulerConfig},
    images::{DecodeLimits, FetchLimits},
    models::generation::GenerationLimits,
};

/// Models, device, batching and limits: everything needed to build the cascade in-process.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// BLIP checkpoint folder (Hugging Face layout: config.json, model.safetensors, tokenizer.json, preprocessor_config.json).
    #[arg(long, env = "CAPTION_BLIP_MODEL", default_value = "models/shapes-blip")]
    pub blip_model: PathBuf,
    /// CLIP checkpoint folder (Hugging Face layout).
    #[arg(long, env = "CAPTION_CLIP_MODEL", default_value = "models/shapes-clip")]
    pub clip_model: PathBuf,
    /// Device the models run on.
    #[arg(long, env = "CAPTION_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Executor threads that run model batches (each runs one batch at a time).
    #[arg(long, env = "CAPTION_EXECUTORS", default_value_t = 1)]
    pub executors: usize,
    /// libtorch intra-op threads per executor on CPU; default: the cores divided among executors.
    #[arg(long, env = "CAPTION_INTRA_OP_THREADS")]
    pub intra_op_threads: Option<i32>,
    /// Largest number of images BLIP decodes together.
    #[arg(long, env = "CAPTION_GENERATE_MAX_BATCH", default_value_t = 8)]
    pub generate_max_batch: usize,
    /// Largest number of images CLIP ranks together.
    #[arg(long, env = "CAPTION_RANK_MAX_BATCH", default_value_t = 32)]
    pub rank_max_batch: usize,
    /// How long the oldest queued request waits for its batch to fill, in milliseconds.
    #[arg(long, env = "CAPTION_MAX_QUEUE_DELAY_MS", default_value_t = 5)]
    pub max_queue_delay_ms: u64,
    /// Requests allowed to wait per model; beyond it calls fail fast with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CAPTION_MAX_QUEUE_SIZE", default_value_t = 256)]
    pub max_queue_size: usize,
    /// Most candidate captions one request may ask for.
    #[arg(long, env = "CAPTION_MAX_CANDIDATES", default_value_t = 32)]
    pub max_candidates: u32,
    /// Longest token sequence a request may ask for (also capped by the model's positions).
    #[arg(long, env = "CAPTION_MAX_LENGTH", default_value_t = 80)]
    pub max_length: u32,
    /// Most captions one Rank request may carry.
    #[arg(long, env = "CAPTION_MAX_CAPTIONS", default_value_t = 64)]
    pub max_captions: usize,
    /// Longest caption a Rank request may carry, in bytes.
    #[arg(long, env = "CAPTION_MAX_CAPTION_BYTES", default_value_t = 1024)]
    pub max_caption_bytes: usize,
    /// Calls admitted at once (fetching, queued or computing); beyond it calls fail fast with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CAPTION_MAX_INFLIGHT", default_value_t = 1024)]
    pub max_inflight: usize,
    /// Largest encoded image accepted, inline or fetched, in bytes.
    #[arg(long, env = "CAPTION_MAX_IMAGE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_image_bytes: u64,
    /// Timeout of one http(s) image fetch, in seconds.
    #[arg(long, env = "CAPTION_FETCH_TIMEOUT_S", default_value_t = 10)]
    pub fetch_timeout_s: u64,
    /// Directory whose files may be named by file:// URLs; file:// is refused without it.
    #[arg(long, env = "CAPTION_ALLOW_FILE_DIR")]
    pub allow_file_dir: Option<PathBuf>,
    /// Most pixels an image may have; larger ones are refused before decoding.
    #[arg(long, env = "CAPTION_MAX_IMAGE_PIXELS", default_value_t = DecodeLimits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Most pixels per encoded byte an image above 4 Mpx may declare (bounds the decode work a small
    /// file can cause; even a blank RGB PNG uses under 300, only blank palette PNGs and GIFs go beyond).
    #[arg(long, env = "CAPTION_MAX_IMAGE_PIXELS_PER_BYTE", default_value_t = DecodeLimits::default().max_pixels_per_byte)]
    pub max_image_pixels_per_byte: u64,
    /// Image decodes running at once in each of two lanes (images up to 4 Mpx, larger ones); a
    /// large one holds up to --max-image-pixels × 11 bytes. Default: the CPU count.
    #[arg(long, env = "CAPTION_MAX_CONCURRENT_DECODES")]
    pub max_concurrent_decodes: Option<usize>,
    /// Bytes of model-ready images kept so repeated URLs are fetched once (0 disables);
    /// default: 2% of the memory limit (cgroup, else physical memory), at least 16 MiB.
    #[arg(long, env = "CAPTION_IMAGE_CACHE_BYTES")]
    pub image_cache_bytes: Option<u64>,
}

/// Flags of the server alone.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "CAPTION_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`/metrics`); off when unset.
    #[arg(long, env = "CAPTION_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC request message, in bytes.
    #[arg(long, env = "CAPTION_MAX_MESSAGE_BYTES", default_value_t = crate::api::server::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
}

impl EngineArgs {
    pub fn scheduler_config(&self) -> SchedulerConfig {
        let delay = Duration::from_millis(self.max_queue_delay_ms);
        SchedulerConfig {
            executors: self.executors.max(1),
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

    pub fn fetch_limits(&self) -> FetchLimits {
        FetchLimits {
            max_bytes: self.max_image_bytes,
            timeout: Duration::from_secs(self.fetch_timeout_s),
            allow_file_dir: self.allow_file_dir.clone(),
        }
    }

    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            generation: GenerationLimits { max_candidates: self.max_candidates, max_length: self.max_length },
            max_captions: self.max_captions,
            max_caption_bytes: self.max_caption_bytes,
            max_inflight: self.max_inflight,
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
        self.image_cache_bytes.unwrap_or_else(|| (memory_limit() / 50).max(16 << 20))
    }

    pub fn intra_op_threads(&self, device: tch::Device) -> Option<i32> {
        if device != tch::Device::Cpu {
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some(self.intra_op_threads.unwrap_or_else(|| (cores / self.executors.max(1)).max(1) as i32))
    }
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
