//! Command-line and environment configuration of the engine and server, turned once into the
//! typed settings the layers below receive. Building the application from them is [`crate::app`]'s.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use ipnet::IpNet;

use crate::{
    api::{
        auth::BearerAuth,
        edge::{EdgeConfig, TlsFiles},
        StreamLimits,
    },
    backend::{DeviceChoice, Precision, Quantize},
    cascade::{RequestLimits, ResultCacheConfig},
    engine::{QueueConfig, SchedulerConfig},
    images::{DecodeLimits, EgressPolicy, FetchLimits},
    upstream::UpstreamToken,
    validate::{CaptionLimits, GenerationLimits},
    watched,
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
    /// Precision the models compute in: fp32 (the reference's numbers), bf16, fp16, or auto (bf16
    /// where the device computes it natively, else fp32; logged at start). docs/benchmark.md, Precision.
    #[arg(long, env = "CAPTION_DTYPE", value_enum, default_value_t = Precision::Fp32)]
    pub dtype: Precision,
    /// int8: every linear layer of both models holds int8 weights and quantizes each input row on
    /// the fly (CPU with --dtype fp32 only). Faster on CPUs; captions move slightly:
    /// docs/benchmark.md, Precision, has both.
    #[arg(long, env = "CAPTION_QUANTIZE", value_enum, default_value_t = Quantize::None)]
    pub quantize: Quantize,
    /// Replay BLIP's one-token decode steps from CUDA graphs (captured per executor and row
    /// bucket on first use), which saves most kernel launches; CUDA only. docs/benchmark.md.
    #[arg(long, env = "CAPTION_CUDA_GRAPHS")]
    pub cuda_graphs: bool,
    /// Executor threads that run model batches (each runs one batch at a time). Default: 1 for
    /// `serve`, whose one image then has every core (lowest latency); the `caption` bulk job on a
    /// CPU runs one per core with one thread each (highest throughput; README, Command line).
    #[arg(long, env = "CAPTION_EXECUTORS")]
    pub executors: Option<usize>,
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
    /// Timeout of one image fetch (http(s) or file://), in seconds.
    #[arg(long, env = "CAPTION_FETCH_TIMEOUT_S", default_value_t = 10)]
    pub fetch_timeout_s: u64,
    /// Directory whose files may be named by file:// URLs; file:// is refused without it.
    #[arg(long, env = "CAPTION_ALLOW_FILE_DIR")]
    pub allow_file_dir: Option<PathBuf>,
    /// Let http(s) image fetches reach this CIDR (or single address) although the egress policy
    /// denies it by default, e.g. 127.0.0.1/32 for a sidecar. Repeatable or comma-separated. Beats
    /// --fetch-allow-private and the defaults, loses to --fetch-deny. Applies to `serve`;
    /// `caption` without --endpoint fetches with its user's own rights, unrestricted.
    #[arg(long, env = "CAPTION_FETCH_ALLOW", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    pub fetch_allow: Vec<IpNet>,
    /// Keep http(s) image fetches away from this CIDR (or single address) on top of the defaults
    /// (loopback, private, link-local, metadata and other special ranges). Repeatable or
    /// comma-separated; beats every allow. Applies to `serve`.
    #[arg(long, env = "CAPTION_FETCH_DENY", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    pub fetch_deny: Vec<IpNet>,
    /// Let http(s) image fetches reach the private ranges 10/8, 172.16/12, 192.168/16 and fc00::/7
    /// (in-cluster stores); cloud metadata addresses in them stay denied. Applies to `serve`.
    #[arg(long, env = "CAPTION_FETCH_ALLOW_PRIVATE")]
    pub fetch_allow_private: bool,
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

/// A service a process can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    /// caption.v1.Generator: BLIP.
    Generator,
    /// caption.v1.Ranker: CLIP.
    Ranker,
    /// caption.v1.Cascade: generate then rank, with local or remote models.
    Cascade,
}

/// Flags of the server alone.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address the gRPC server listens on. On this and the other listen addresses port 0 takes
    /// any free port; --ready-file and the start-up log tell which.
    #[arg(long, env = "CAPTION_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`/metrics`); off when unset.
    #[arg(long, env = "CAPTION_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC request message, in bytes; a larger one is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CAPTION_MAX_MESSAGE_BYTES", default_value_t = crate::api::server::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// The services this process serves; it loads only the models they need (a cascade whose
    /// generator and ranker are remote loads none).
    #[arg(long, env = "CAPTION_SERVICES", value_enum, value_delimiter = ',', default_values_t = [Service::Generator, Service::Ranker, Service::Cascade])]
    pub services: Vec<Service>,
    /// Where a cascade without a local generator sends Generate calls: http(s)://HOST:PORT, where
    /// HOST may resolve to many replicas (a headless Service), or a comma-separated list of URLs.
    #[arg(long, env = "CAPTION_GENERATOR_ENDPOINT")]
    pub generator_endpoint: Option<String>,
    /// Where a cascade without a local ranker sends Rank calls (as --generator-endpoint).
    #[arg(long, env = "CAPTION_RANKER_ENDPOINT")]
    pub ranker_endpoint: Option<String>,
    /// PEM CA certificate the upstreams' TLS certificates chain to (for https:// endpoints).
    #[arg(long, env = "CAPTION_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// File holding the bearer token the upstreams ask for (its first line, when it has several).
    /// Read again when its content changes, so the token can be rotated without a restart; a file
    /// that becomes empty, missing or malformed keeps the last good token sent (with a warning in
    /// the log) until the upstreams refuse it. Empty or missing at start: an error.
    #[arg(long, env = "CAPTION_UPSTREAM_TOKEN_FILE")]
    pub upstream_token_file: Option<PathBuf>,
    /// Milliseconds one upstream call (a cascade tier's Generate or Rank, retries included) may
    /// take; it bounds the wait for an upstream that does not answer when the caller set no
    /// deadline (or a later one). A caller's earlier deadline still applies.
    #[arg(long, env = "CAPTION_UPSTREAM_TIMEOUT_MS", default_value_t = crate::upstream::DEFAULT_TIMEOUT.as_millis() as u64)]
    pub upstream_timeout_ms: u64,
    /// Milliseconds between looks at the upstreams' replicas (DNS and health); a failed call
    /// also triggers one at once.
    #[arg(long, env = "CAPTION_UPSTREAM_CHECK_INTERVAL_MS", default_value_t = 2000)]
    pub upstream_check_interval_ms: u64,
    /// Requests of one CaptionStream call worked on at once; further ones wait unread.
    #[arg(long, env = "CAPTION_MAX_STREAM_INFLIGHT", default_value_t = StreamLimits::default().inflight)]
    pub max_stream_inflight: usize,
    /// CaptionStream calls open at once in this process (each costs about 20 KB while open);
    /// further ones are refused RESOURCE_EXHAUSTED. Their requests also count toward --max-inflight.
    #[arg(long, env = "CAPTION_MAX_OPEN_STREAMS", default_value_t = StreamLimits::default().max_open)]
    pub max_open_streams: usize,
    /// Seconds a CaptionStream with no request in flight may wait for its next one before it is
    /// ended with DEADLINE_EXCEEDED (0: never).
    #[arg(long, env = "CAPTION_STREAM_IDLE_TIMEOUT_S", default_value_t = StreamLimits::default().idle_timeout.as_secs())]
    pub stream_idle_timeout_s: u64,
    /// Open connections at most; further ones are closed as soon as they are accepted.
    #[arg(long, env = "CAPTION_MAX_CONNECTIONS", default_value_t = EdgeConfig::default().max_connections)]
    pub max_connections: usize,
    /// Seconds a new connection has to send its first request (TLS handshake included).
    #[arg(long, env = "CAPTION_HANDSHAKE_TIMEOUT_S", default_value_t = EdgeConfig::default().handshake_timeout.as_secs())]
    pub handshake_timeout_s: u64,
    /// Seconds a connection may stay without any call before it is sent GOAWAY and closed.
    #[arg(long, env = "CAPTION_IDLE_TIMEOUT_S", default_value_t = EdgeConfig::default().idle_timeout.as_secs())]
    pub idle_timeout_s: u64,
    /// Seconds between HTTP/2 PINGs that check a connection's peer is alive (0: none).
    #[arg(long, env = "CAPTION_KEEPALIVE_INTERVAL_S", default_value_t = 60)]
    pub keepalive_interval_s: u64,
    /// Seconds a PING may go unanswered before the connection is closed.
    #[arg(long, env = "CAPTION_KEEPALIVE_TIMEOUT_S", default_value_t = EdgeConfig::default().keepalive_timeout.as_secs())]
    pub keepalive_timeout_s: u64,
    /// Calls at once on one connection (HTTP/2 max concurrent streams).
    #[arg(long, env = "CAPTION_MAX_CONCURRENT_STREAMS", default_value_t = EdgeConfig::default().max_concurrent_streams)]
    pub max_concurrent_streams: u32,
    /// Seconds in-flight calls get to finish after SIGTERM before their connections are closed
    /// (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "CAPTION_DRAIN_TIMEOUT_S", default_value_t = EdgeConfig::default().drain_timeout.as_secs())]
    pub drain_timeout_s: u64,
    /// PEM certificate chain to serve TLS with (with --tls-key); reloaded when the file changes.
    #[arg(long, env = "CAPTION_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert; reloaded when the file changes.
    #[arg(long, env = "CAPTION_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to (mutual TLS); needs --tls-cert.
    #[arg(long, env = "CAPTION_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token every call except health checks must carry; one token a line
    /// accepts each (while a rotation is under way). Read again within a second when its content
    /// changes, so tokens rotate without a restart; while it is empty, missing or malformed every
    /// call but health checks is refused (and the log says so). Empty or missing at start: an error.
    #[arg(long, env = "CAPTION_AUTH_TOKEN_FILE", conflicts_with = "auth_token")]
    pub auth_token_file: Option<PathBuf>,
    /// The bearer token itself, fixed for the process's life (prefer the environment variable or
    /// --auth-token-file: a flag's value shows in the process list).
    #[arg(long, env = "CAPTION_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Do not serve gRPC reflection.
    #[arg(long, env = "CAPTION_NO_REFLECTION", conflicts_with = "reflection_listen")]
    pub no_reflection: bool,
    /// Serve gRPC reflection on this address instead of beside the services.
    #[arg(long, env = "CAPTION_REFLECTION_LISTEN")]
    pub reflection_listen: Option<SocketAddr>,
    /// Also serve the gRPC health check on this address, in plaintext and without a token (for
    /// Kubernetes probes when the main port has TLS or a token).
    #[arg(long, env = "CAPTION_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Once every listener is bound, write the addresses they got to this file as JSON, e.g.
    /// {"grpc":"127.0.0.1:41234","metrics":null,"health":null,"reflection":null}; written whole
    /// (a temporary file renamed over it), and removed at start and on a clean exit.
    #[arg(long, env = "CAPTION_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Bytes of Caption answers kept to answer repeated deterministic requests (greedy, beam, or
    /// sampling with a seed; same image content and parameters) without computing; least recently
    /// used out; 0 turns the result cache off. URLs are revalidated with their origin (ETag,
    /// Last-Modified) or fetched again, so a changed image is never answered from it.
    #[arg(long, env = "CAPTION_RESULT_CACHE_BYTES", default_value_t = 0)]
    pub result_cache_bytes: u64,
    /// Seconds a cached Caption answer may be served; older ones are computed again (0 turns the
    /// result cache off).
    #[arg(long, env = "CAPTION_RESULT_CACHE_TTL_S", default_value_t = 300)]
    pub result_cache_ttl_s: u64,
    /// Milliseconds between looks at the TLS and token files, which are read again when their
    /// content changes. Hidden: the tests shorten it.
    #[arg(long, hide = true, default_value_t = watched::RECHECK.as_millis() as u64)]
    pub file_recheck_ms: u64,
}

impl ServerArgs {
    /// The edge's settings; loads the TLS files, so a bad one stops the server at start.
    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits {
            inflight: self.max_stream_inflight,
            max_open: self.max_open_streams,
            idle_timeout: Duration::from_secs(self.stream_idle_timeout_s),
        }
    }

    pub fn edge_config(&self) -> Result<EdgeConfig, String> {
        let secs = Duration::from_secs;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(TlsFiles::load(cert, key, self.tls_client_ca.as_deref(), self.file_recheck())?)
            }
            _ => None,
        };
        Ok(EdgeConfig {
            max_connections: self.max_connections.max(1),
            handshake_timeout: secs(self.handshake_timeout_s.max(1)),
            idle_timeout: secs(self.idle_timeout_s.max(1)),
            keepalive_interval: (self.keepalive_interval_s > 0).then(|| secs(self.keepalive_interval_s)),
            keepalive_timeout: secs(self.keepalive_timeout_s.max(1)),
            max_concurrent_streams: self.max_concurrent_streams.max(1),
            drain_timeout: secs(self.drain_timeout_s),
            tls,
            ..EdgeConfig::default()
        })
    }

    /// How long one upstream call may take (`--upstream-timeout-ms`, at least a millisecond).
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout_ms.max(1))
    }

    /// The result cache's settings (off when either is 0).
    pub fn result_cache(&self) -> ResultCacheConfig {
        ResultCacheConfig {
            capacity_bytes: usize::try_from(self.result_cache_bytes).unwrap_or(usize::MAX),
            ttl: Duration::from_secs(self.result_cache_ttl_s),
        }
    }

    /// The tokens calls must carry; a token file without one stops the server at start.
    pub fn auth(&self) -> Result<Option<BearerAuth>, String> {
        match (&self.auth_token_file, &self.auth_token) {
            (Some(path), _) => BearerAuth::from_file(path, self.file_recheck()).map(Some),
            (None, Some(token)) => BearerAuth::fixed(token).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The token a cascade tier sends its upstreams; a token file without one stops it at start.
    pub fn upstream_token(&self) -> Result<Option<UpstreamToken>, String> {
        self.upstream_token_file.as_deref().map(|path| UpstreamToken::load(path, self.file_recheck())).transpose()
    }

    fn file_recheck(&self) -> Duration {
        Duration::from_millis(self.file_recheck_ms.max(1))
    }
}

impl EngineArgs {
    /// How the models hold and compute their numbers on `device` (`--dtype`, `--quantize`,
    /// `--cuda-graphs`).
    pub fn numerics(&self, device: tch::Device) -> Result<crate::models::Numerics, String> {
        let numerics = self.quantize.numerics(device, self.dtype)?;
        Ok(crate::models::Numerics { graphs: crate::backend::graph_mode(device, self.cuda_graphs)?, ..numerics })
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
        let delay = Duration::from_millis(self.max_queue_delay_ms);
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

    pub fn fetch_limits(&self) -> FetchLimits {
        FetchLimits {
            max_bytes: self.max_image_bytes,
            timeout: Duration::from_secs(self.fetch_timeout_s),
            allow_file_dir: self.allow_file_dir.clone(),
            egress: EgressPolicy::new(self.fetch_allow.clone(), self.fetch_deny.clone(), self.fetch_allow_private),
        }
    }

    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            generation: GenerationLimits { max_candidates: self.max_candidates, max_length: self.max_length },
            captions: CaptionLimits { max_captions: self.max_captions, max_caption_bytes: self.max_caption_bytes },
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
