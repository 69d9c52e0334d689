//! Traces over OTLP/gRPC (`--otlp-endpoint`): the exporter and its resource, and W3C trace
//! context (`traceparent`, `tracestate`) read from a call's metadata and written into the metadata
//! of the calls it makes, so that the tiers of a split deployment add to one trace.

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Status, TracerProvider as _},
    Context, Key, KeyValue,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider},
    Resource,
};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The name spans are exported under unless `OTEL_SERVICE_NAME` (or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`) gives another, as one per tier would.
const SERVICE_NAME: &str = "caption-cascade";

/// The exporter of spans to the OTLP/gRPC collector at `endpoint` (`http://HOST:PORT`), batching
/// them on a thread of its own; the tracer the log's spans become spans through.
pub(super) fn exporter(endpoint: &str) -> anyhow::Result<(SdkTracerProvider, SdkTracer)> {
    let url: http::Uri = endpoint.parse().map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {e}"))?;
    match url.scheme_str() {
        Some("http") if url.host().is_some() => {}
        Some("https") => anyhow::bail!(
            "--otlp-endpoint {endpoint:?}: only plaintext OTLP (http://) is spoken; run a collector beside the server"
        ),
        _ => anyhow::bail!("--otlp-endpoint {endpoint:?}: expected http://HOST:PORT"),
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {e}"))?;
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource()).build();
    let tracer = provider.tracer(SERVICE_NAME);
    Ok((provider, tracer))
}

fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected.get(&Key::new("service.name")).is_some_and(|n| !n.as_str().starts_with("unknown_service"));
    let builder = Resource::builder().with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named { builder } else { builder.with_service_name(SERVICE_NAME) }.build()
}

/// The trace a call belongs to, as its caller's `traceparent` names it (none: a trace of its own).
#[derive(Clone, Default)]
pub struct TraceParent(Context);

impl TraceParent {
    /// What `metadata` says; a missing or malformed `traceparent` is no parent.
    pub fn of(metadata: &MetadataMap) -> Self {
        Self(TraceContextPropagator::new().extract(&Extract(metadata)))
    }

    /// Makes `span`, just created, the caller's span's child. Nothing happens when no traces are
    /// exported.
    pub fn adopt(self, span: &tracing::Span) {
        let _ = span.set_parent(self.0);
    }
}

/// Writes `span`'s trace context into `metadata`, so that the callee's span is its child. Nothing
/// is written when no traces are exported.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut Inject(metadata));
}

/// Marks `span` as failed with gRPC status `code` (its canonical name), for trace viewers.
pub fn failed(span: &tracing::Span, code: &'static str) {
    span.set_status(Status::error(code));
}

struct Extract<'a>(&'a MetadataMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct Inject<'a>(&'a mut MetadataMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;
    use tonic::metadata::MetadataMap;

    use super::{Inject, TraceContextPropagator, TraceParent};
    use opentelemetry::propagation::TextMapPropagator;

    #[test]
    fn a_traceparent_in_metadata_is_read_and_written_back_the_same() {
        let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", sent.parse().unwrap());
        metadata.insert("tracestate", "vendor=x".parse().unwrap());
        let TraceParent(cx) = TraceParent::of(&metadata);
        let span = cx.span();
        let parent = span.span_context();
        assert!(parent.is_valid() && parent.is_remote() && parent.is_sampled());
        assert_eq!(parent.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut out = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut Inject(&mut out));
        assert_eq!(out.get("traceparent").unwrap(), sent);
        assert_eq!(out.get("tracestate").unwrap(), "vendor=x");
    }

    #[test]
    fn a_malformed_traceparent_is_no_parent() {
        for bad in ["00-zz-00f067aa0ba902b7-01", "garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"] {
            let mut metadata = MetadataMap::new();
            metadata.insert("traceparent", bad.parse().unwrap());
            let TraceParent(cx) = TraceParent::of(&metadata);
            assert!(!cx.span().span_context().is_valid(), "{bad}");
        }
    }
}
