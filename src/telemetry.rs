//! Prometheus metrics: the recorder, its `/metrics` endpoint on a listener the caller bound, and
//! the bucket layout of every histogram. Metric names share the `caption_` prefix; the code that
//! measures records through the `metrics` macros. Also how untrusted text enters a log field.

mod endpoint;
mod field;

pub use field::{untrusted, Untrusted};

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;

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
