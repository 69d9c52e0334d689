//! The server's own flags (listeners, connections, streams, TLS and tokens, the split topology's
//! upstreams, the result cache) and the settings they become.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use super::units::{self, Size, Span};
use crate::{
    api::{
        auth::BearerAuth,
        edge::{EdgeConfig, TlsFiles},
        StreamLimits,
    },
    cascade::ResultCacheConfig,
    upstream::UpstreamToken,
    watched,
};

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
    #[arg(help_heading = "Listeners", long, env = "CAPTION_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`/metrics`); off when unset.
    #[arg(help_heading = "Listeners", long, env = "CAPTION_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC request message (bytes, or with a unit: 32MiB); a larger one is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(help_heading = "Connections", long, env = "CAPTION_MAX_MESSAGE_BYTES", value_parser = units::bytes, default_value_t = Size(crate::api::server::MAX_MESSAGE_BYTES as u64))]
    pub max_message_bytes: Size,
    /// The services this process serves; it loads only the models they need (a cascade whose
    /// generator and ranker are remote loads none).
    #[arg(help_heading = "Services and split topology", long, env = "CAPTION_SERVICES", value_enum, value_delimiter = ',', default_values_t = [Service::Generator, Service::Ranker, Service::Cascade])]
    pub services: Vec<Service>,
    /// Where a cascade without a local generator sends Generate calls: HOST:PORT (https when
    /// --upstream-ca is set) or http(s)://HOST:PORT, where HOST may resolve to many replicas (a
    /// headless Service), or a comma-separated list of them.
    #[arg(help_heading = "Services and split topology", long, env = "CAPTION_GENERATOR_ENDPOINT")]
    pub generator_endpoint: Option<String>,
    /// Where a cascade without a local ranker sends Rank calls (as --generator-endpoint).
    #[arg(help_heading = "Services and split topology", long, env = "CAPTION_RANKER_ENDPOINT")]
    pub ranker_endpoint: Option<String>,
    /// PEM CA certificate the upstreams' TLS certificates chain to (for https:// endpoints).
    #[arg(help_heading = "Services and split topology", long, env = "CAPTION_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// File holding the bearer token the upstreams ask for (its first line, when it has several).
    /// Read again when its content changes, so the token can be rotated without a restart; a file
    /// that becomes empty, missing or malformed keeps the last good token sent (with a warning in
    /// the log) until the upstreams refuse it. Empty or missing at start: an error.
    #[arg(help_heading = "Services and split topology", long, env = "CAPTION_UPSTREAM_TOKEN_FILE")]
    pub upstream_token_file: Option<PathBuf>,
    /// How long one upstream call (a cascade tier's Generate or Rank, retries included) may take
    /// (a bare number: milliseconds); it bounds the wait for an upstream that does not answer when
    /// the caller set no deadline (or a later one). A caller's earlier deadline still applies.
    #[arg(help_heading = "Services and split topology", long, env = "CAPTION_UPSTREAM_TIMEOUT_MS", visible_alias = "upstream-timeout-ms", value_parser = units::millis, default_value_t = Span(crate::upstream::DEFAULT_TIMEOUT))]
    pub upstream_timeout: Span,
    /// Time between looks at the upstreams' replicas, DNS and health (a bare number:
    /// milliseconds); a failed call also triggers one at once.
    #[arg(help_heading = "Services and split topology", long, env = "CAPTION_UPSTREAM_CHECK_INTERVAL_MS", visible_alias = "upstream-check-interval-ms", value_parser = units::millis, default_value_t = Span(Duration::from_secs(2)))]
    pub upstream_check_interval: Span,
    /// Requests of one CaptionStream call worked on at once; further ones wait unread.
    #[arg(help_heading = "Streams", long, env = "CAPTION_MAX_STREAM_INFLIGHT", default_value_t = StreamLimits::default().inflight)]
    pub max_stream_inflight: usize,
    /// CaptionStream calls open at once in this process (each costs about 20 KB while open);
    /// further ones are refused RESOURCE_EXHAUSTED. Their requests also count toward --max-inflight.
    #[arg(help_heading = "Streams", long, env = "CAPTION_MAX_OPEN_STREAMS", default_value_t = StreamLimits::default().max_open)]
    pub max_open_streams: usize,
    /// How long a CaptionStream with no request in flight may wait for its next one before it is
    /// ended with DEADLINE_EXCEEDED (a bare number: seconds; 0: never).
    #[arg(help_heading = "Streams", long, env = "CAPTION_STREAM_IDLE_TIMEOUT_S", visible_alias = "stream-idle-timeout-s", value_parser = units::seconds, default_value_t = Span(StreamLimits::default().idle_timeout))]
    pub stream_idle_timeout: Span,
    /// Open connections at most; further ones are closed as soon as they are accepted.
    #[arg(help_heading = "Connections", long, env = "CAPTION_MAX_CONNECTIONS", default_value_t = EdgeConfig::default().max_connections)]
    pub max_connections: usize,
    /// How long a new connection has to send its first request, TLS handshake included (a bare
    /// number: seconds).
    #[arg(help_heading = "Connections", long, env = "CAPTION_HANDSHAKE_TIMEOUT_S", visible_alias = "handshake-timeout-s", value_parser = units::seconds, default_value_t = Span(EdgeConfig::default().handshake_timeout))]
    pub handshake_timeout: Span,
    /// How long a connection may stay without any call before it is sent GOAWAY and closed (a bare
    /// number: seconds).
    #[arg(help_heading = "Connections", long, env = "CAPTION_IDLE_TIMEOUT_S", visible_alias = "idle-timeout-s", value_parser = units::seconds, default_value_t = Span(EdgeConfig::default().idle_timeout))]
    pub idle_timeout: Span,
    /// Time between HTTP/2 PINGs that check a connection's peer is alive (a bare number: seconds;
    /// 0: none).
    #[arg(help_heading = "Connections", long, env = "CAPTION_KEEPALIVE_INTERVAL_S", visible_alias = "keepalive-interval-s", value_parser = units::seconds, default_value_t = Span(Duration::from_secs(60)))]
    pub keepalive_interval: Span,
    /// How long a PING may go unanswered before the connection is closed (a bare number: seconds).
    #[arg(help_heading = "Connections", long, env = "CAPTION_KEEPALIVE_TIMEOUT_S", visible_alias = "keepalive-timeout-s", value_parser = units::seconds, default_value_t = Span(EdgeConfig::default().keepalive_timeout))]
    pub keepalive_timeout: Span,
    /// Calls at once on one connection (HTTP/2 max concurrent streams).
    #[arg(help_heading = "Connections", long, env = "CAPTION_MAX_CONCURRENT_STREAMS", default_value_t = EdgeConfig::default().max_concurrent_streams)]
    pub max_concurrent_streams: u32,
    /// How long in-flight calls get to finish after SIGTERM before their connections are closed (a
    /// bare number: seconds; keep it below the pod's terminationGracePeriodSeconds).
    #[arg(help_heading = "Connections", long, env = "CAPTION_DRAIN_TIMEOUT_S", visible_alias = "drain-timeout-s", value_parser = units::seconds, default_value_t = Span(EdgeConfig::default().drain_timeout))]
    pub drain_timeout: Span,
    /// PEM certificate chain to serve TLS with (with --tls-key); reloaded when the file changes.
    #[arg(help_heading = "TLS and authentication", long, env = "CAPTION_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert; reloaded when the file changes.
    #[arg(help_heading = "TLS and authentication", long, env = "CAPTION_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to (mutual TLS); needs --tls-cert.
    #[arg(help_heading = "TLS and authentication", long, env = "CAPTION_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token every call except health checks must carry; one token a line
    /// accepts each (while a rotation is under way). Read again within a second when its content
    /// changes, so tokens rotate without a restart; while it is empty, missing or malformed every
    /// call but health checks is refused (and the log says so). Empty or missing at start: an error.
    #[arg(
        help_heading = "TLS and authentication",
        long,
        env = "CAPTION_AUTH_TOKEN_FILE",
        conflicts_with = "auth_token"
    )]
    pub auth_token_file: Option<PathBuf>,
    /// The bearer token itself, fixed for the process's life (prefer the environment variable or
    /// --auth-token-file: a flag's value shows in the process list).
    #[arg(help_heading = "TLS and authentication", long, env = "CAPTION_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Do not serve gRPC reflection.
    #[arg(help_heading = "Listeners", long, env = "CAPTION_NO_REFLECTION", conflicts_with = "reflection_listen")]
    pub no_reflection: bool,
    /// Serve gRPC reflection on this address instead of beside the services.
    #[arg(help_heading = "Listeners", long, env = "CAPTION_REFLECTION_LISTEN")]
    pub reflection_listen: Option<SocketAddr>,
    /// Also serve the gRPC health check on this address, in plaintext and without a token (for
    /// Kubernetes probes when the main port has TLS or a token).
    #[arg(help_heading = "Listeners", long, env = "CAPTION_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Once every listener is bound, write the addresses they got to this file as JSON, e.g.
    /// {"grpc":"127.0.0.1:41234","metrics":null,"health":null,"reflection":null}; written whole
    /// (a temporary file renamed over it), and removed at start and on a clean exit.
    #[arg(help_heading = "Listeners", long, env = "CAPTION_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Bytes of Caption answers (a unit may follow: 64MiB) kept to answer repeated deterministic requests (greedy, beam, or
    /// sampling with a seed; same image content and parameters) without computing; least recently
    /// used out; 0 turns the result cache off. URLs are revalidated with their origin (ETag,
    /// Last-Modified) or fetched again, so a changed image is never answered from it.
    #[arg(help_heading = "Result cache", long, env = "CAPTION_RESULT_CACHE_BYTES", value_parser = units::bytes, default_value_t = Size(0))]
    pub result_cache_bytes: Size,
    /// How long a cached Caption answer may be served; older ones are computed again (a bare
    /// number: seconds; 0 turns the result cache off).
    #[arg(help_heading = "Result cache", long, env = "CAPTION_RESULT_CACHE_TTL_S", visible_alias = "result-cache-ttl-s", value_parser = units::seconds, default_value_t = Span(Duration::from_secs(300)))]
    pub result_cache_ttl: Span,
    /// Time between looks at the TLS and token files, which are read again when their content
    /// changes (a bare number: milliseconds). Hidden: the tests shorten it.
    #[arg(long, hide = true, alias = "file-recheck-ms", value_parser = units::millis, default_value_t = Span(watched::RECHECK))]
    pub file_recheck: Span,
}

impl ServerArgs {
    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits {
            inflight: self.max_stream_inflight,
            max_open: self.max_open_streams,
            idle_timeout: self.stream_idle_timeout.0,
        }
    }

    /// The edge's settings; loads the TLS files, so a bad one stops the server at start.
    pub fn edge_config(&self) -> Result<EdgeConfig, String> {
        let at_least_a_second = |span: Span| span.0.max(Duration::from_secs(1));
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(TlsFiles::load(cert, key, self.tls_client_ca.as_deref(), self.file_recheck())?)
            }
            _ => None,
        };
        Ok(EdgeConfig {
            max_connections: self.max_connections.max(1),
            handshake_timeout: at_least_a_second(self.handshake_timeout),
            idle_timeout: at_least_a_second(self.idle_timeout),
            keepalive_interval: (!self.keepalive_interval.0.is_zero()).then_some(self.keepalive_interval.0),
            keepalive_timeout: at_least_a_second(self.keepalive_timeout),
            max_concurrent_streams: self.max_concurrent_streams.max(1),
            drain_timeout: self.drain_timeout.0,
            tls,
            ..EdgeConfig::default()
        })
    }

    /// How long one upstream call may take (`--upstream-timeout`, at least a millisecond).
    pub fn upstream_timeout(&self) -> Duration {
        self.upstream_timeout.0.max(Duration::from_millis(1))
    }

    /// Time between looks at the upstreams' replicas (at least 10 ms).
    pub fn upstream_check_interval(&self) -> Duration {
        self.upstream_check_interval.0.max(Duration::from_millis(10))
    }

    /// The result cache's settings (off when either is 0).
    pub fn result_cache(&self) -> ResultCacheConfig {
        ResultCacheConfig { capacity_bytes: self.result_cache_bytes.usize(), ttl: self.result_cache_ttl.0 }
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
        self.file_recheck.0.max(Duration::from_millis(1))
    }
}
