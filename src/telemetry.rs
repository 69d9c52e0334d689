//! What the process tells its operators: Prometheus metrics (the recorder, its `/metrics` endpoint
//! on a listener the caller bound, the bucket layout of every histogram; metric names share the
//! `caption_` prefix and the code that measures records through the `metrics` macros), the log
//! ([`logs`]) and how untrusted text enters a log field, and traces ([`trace`]).

mod endpoint;
mod field;
mod logs;
mod trace;

pub use field::{untrusted, Untrusted};
pub use logs::{LogFormat, LogLevel};
pub use trace::{failed, inject, TraceParent};

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;
use tracing_subscriber::{
    filter::Targets,
    fmt::format::JsonFields,
    layer::{Layer, SubscriberExt},
    util::SubscriberInitExt,
};

/// How the process logs and traces.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub log_format: LogFormat,
    pub log_level: LogLevel,
    /// The OTLP/gRPC collector spans are exported to (`http://HOST:PORT`); none: no traces.
    pub otlp_endpoint: Option<String>,
}

/// The installed log and trace exporter, until [`Telemetry::shutdown`].
pub struct Telemetry {
    format: LogFormat,
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Installs this process's log on stderr and, with an OTLP endpoint, its trace exporter: spans of
/// this crate at INFO and above are exported whatever the log keeps.
pub fn install(settings: &Settings) -> anyhow::Result<Telemetry> {
    let (filter, ignored) = logs::filter(settings.log_level, std::env::var("RUST_LOG").ok().as_deref());
    let log = match settings.log_format {
        LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(logs::stderr_colour()).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(logs::JsonLine)
            .boxed(),
    }
    .with_filter(filter);
    let (traces, exported) = match &settings.otlp_endpoint {
        Some(endpoint) => {
            let (provider, tracer) = trace::exporter(endpoint)?;
            let own = Targets::new().with_target("caption_cascade", tracing::Level::INFO);
            (Some(provider), Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(own)))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(log).with(exported).try_init()?;
    if let Some(why) = ignored {
        tracing::warn!("{why}");
    }
    if let Some(endpoint) = &settings.otlp_endpoint {
        tracing::info!(endpoint, "exporting traces over OTLP");
    }
    Ok(Telemetry { format: settings.log_format, traces })
}

impl Telemetry {
    /// Reports the error a command ended with, in the log's format whatever its level.
    pub fn fatal(&self, e: &anyhow::Error) {
        match self.format {
            LogFormat::Text => eprintln!("error: {e:#}"),
            LogFormat::Json => {
                let message = serde_json::Value::from(format!("{e:#}"));
                eprintln!("{}", logs::line("ERROR", message, serde_json::Map::new(), "caption_cascade"));
            }
        }
    }

    /// Sends the spans not yet exported; the exporter's thread may block, so it is waited on aside.
    pub async fn shutdown(self) {
        if let Some(provider) = self.traces {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "the last spans may not have been exported");
            }
        }
    }
}

/// Seconds, from a millisecond to a minute.
const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Requests (or images) per batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Installs the Prometheus recorder as this process's global one and serves `/metrics` in
/// Prometheus text format on `listener` (from the current tokio runtime). Returns the address
/// served, which is the one to report when the listener was bound to port 0.
pub fn install_exporter(listener: TcpListener) -> anyhow::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("caption_batch_size".into()), BATCH_BUCKETS)?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    describe();
    endpoint::spawn(listener, handle);
    Ok(addr)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("caption_requests_total", "gRPC calls by service and status code");
    describe_histogram!("caption_request_duration_seconds", Unit::Seconds, "gRPC call latency by service");
    describe_gauge!("caption_inflight_requests", "gRPC calls being served, by service");
    describe_gauge!("caption_open_streams", "CaptionStream calls open (bounded by --max-open-streams)");
    describe_histogram!("caption_queue_duration_seconds", Unit::Seconds, "time requests wait in a model queue");
    describe_histogram!(
        "caption_compute_duration_seconds",
        Unit::Seconds,
        "time from a request's start on an executor to its result"
    );
    describe_histogram!("caption_batch_size", "requests per model batch (per decode step for generate)");
    describe_gauge!("caption_queue_depth", "requests waiting per model queue");
    describe_counter!("caption_decode_steps_total", "decoder forward steps");
    describe_counter!("caption_rejected_requests_total", "requests refused because a queue was full");
    describe_counter!(
        "caption_dropped_requests_total",
        "accepted requests dropped before completion (cancelled, deadline)"
    );
    describe_counter!(
        "caption_upstream_invalid_answers_total",
        "a cascade tier's upstream answers refused as breaking the contract, by service and reason"
    );
    describe_counter!("caption_images_fetched_total", "images fetched by URL, by outcome");
    describe_counter!("caption_fetch_denied_total", "image fetches refused by the egress policy (--fetch-allow/-deny)");
    describe_counter!("caption_image_cache_hits_total", "image lookups served from the cache or a shared fetch");
    describe_gauge!("caption_image_cache_bytes", Unit::Bytes, "bytes of model-ready images kept by the image cache");
    describe_gauge!("caption_image_cache_entries", "images kept by the image cache");
    describe_counter!("caption_image_cache_evictions_total", "images evicted from the cache to stay within its bytes");
    describe_counter!(
        "caption_result_cache_hits_total",
        "Caption answers served from the result cache (or from an identical call computing at once)"
    );
    describe_counter!("caption_result_cache_misses_total", "cacheable Caption calls computed (and then kept)");
    describe_counter!(
        "caption_result_cache_bypassed_total",
        "Caption calls the result cache may not answer: sampling without a seed"
    );
    describe_gauge!(
        "caption_result_cache_bytes",
        Unit::Bytes,
        "bytes held by the result cache (answers and the URLs' validators)"
    );
    describe_gauge!("caption_result_cache_entries", "answers kept by the result cache");
    describe_counter!(
        "caption_result_cache_revalidations_total",
        "image URLs checked for a cacheable Caption: not_modified (304), changed (new bytes), no_validator (fetched in full)"
    );
}
