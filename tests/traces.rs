//! Traces as a collector receives them over OTLP/gRPC (`--otlp-endpoint`), from a receiver this
//! test runs on loopback: a call's span carries its service and correlation key, is marked failed
//! with the call's code, and continues the trace the caller's `traceparent` names; in the split
//! topology the cascade tier's upstream calls carry the trace on, so the generator's and the
//! ranker's spans are children of the cascade's (and its upstream calls are counted by gRPC's
//! canonical code names).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use caption_cascade::pb::{self, cascade_client::CascadeClient};
use common::{png_image, scenes::draw_scene, server, ServerProcess};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value, KeyValue},
    trace::v1::{status::StatusCode, Span},
};
use rand::{rngs::StdRng, SeedableRng};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{metadata::MetadataValue, transport::Channel, Request, Response, Status};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Clone)]
struct Received {
    process: String,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
}

fn attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

type Spans = Arc<Mutex<Vec<Received>>>;

struct Receiver(Spans);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let process =
                resource_spans.resource.as_ref().and_then(|r| attr(&r.attributes, "service.name")).unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| Received { process: process.clone(), span }));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// An OTLP trace receiver on a loopback port of its own: its address and what it has received.
async fn receiver() -> (std::net::SocketAddr, Spans) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Spans::default();
    let service = TraceServiceServer::new(Receiver(spans.clone()));
    tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, spans)
}

/// The spans received once `found` picks one out of them, within a minute.
async fn wait_for_span(spans: &Spans, what: &str, found: impl Fn(&Received) -> bool) -> Received {
    let start = Instant::now();
    loop {
        if let Some(span) = spans.lock().unwrap().iter().find(|s| found(s)) {
            return span.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no span {what} was exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Spans go out a tenth of a second after they end rather than the default five.
const QUICK_EXPORT: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `message` as a call in the trace `TRACE_ID`, from the caller's span `PARENT_ID`.
fn traced<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    let parent = MetadataValue::try_from(format!("00-{TRACE_ID}-{PARENT_ID}-01")).unwrap();
    request.metadata_mut().insert("traceparent", parent);
    request
}

fn caption(png: Vec<u8>) -> pb::CaptionRequest {
    let params = pb::GenerationParams { num_candidates: Some(2), max_length: Some(6), ..Default::default() };
    pb::CaptionRequest { image: png_image(png), params: Some(params), ..Default::default() }
}

async fn channel(process: &ServerProcess) -> Channel {
    Channel::from_shared(format!("http://{}", process.addr())).unwrap().connect().await.unwrap()
}

#[tokio::test]
async fn a_call_is_a_span_of_its_callers_trace_with_its_key() {
    let (collector, spans) = receiver().await;
    // HOST:PORT, as gRPC tools write an endpoint; spans are exported whatever the log keeps.
    let args = ["--otlp-endpoint", &collector.to_string(), "--log-level", "error"];
    let process = server(&args).env_remove("RUST_LOG").env(QUICK_EXPORT.0, QUICK_EXPORT.1).start().await;
    let mut cascade = CascadeClient::new(channel(&process).await);
    let scene = draw_scene(&mut StdRng::seed_from_u64(5));
    let answer = cascade.caption(traced(caption(scene.png()))).await.unwrap().into_inner();
    let err = cascade.caption(caption(b"not an image".to_vec())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let ok =
        wait_for_span(&spans, "of the traced call", |s| s.attr("key").as_deref() == Some(answer.key.as_str())).await;
    assert_eq!(ok.span.name, "call");
    assert_eq!(ok.attr("service").as_deref(), Some("Caption"));
    assert_eq!(hex(&ok.span.trace_id), TRACE_ID, "the caller's trace goes on");
    assert_eq!(hex(&ok.span.parent_span_id), PARENT_ID, "the caller's span is the parent");
    assert_ne!(ok.span.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
    assert_eq!(ok.process, "caption-cascade", "the service name when OTEL_SERVICE_NAME is unset");
    let answered = ok.span.events.iter().find(|e| e.name == "answered").expect("the answered line, as an event");
    assert_eq!(attr(&answered.attributes, "code").as_deref(), Some("OK"));
    assert!(!process.log().contains("answered"), "the log keeps errors only:\n{}", process.log());

    let failed = wait_for_span(&spans, "of the failed call", |s| {
        s.span.status.as_ref().is_some_and(|st| st.code == StatusCode::Error as i32)
    })
    .await;
    assert_eq!(failed.span.status.as_ref().unwrap().message, "INVALID_ARGUMENT");
    assert_ne!(hex(&failed.span.trace_id), TRACE_ID, "a call without traceparent starts a trace");
    assert!(failed.span.parent_span_id.is_empty(), "a root span");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_split_topology_adds_to_one_trace_across_its_hop() {
    let (collector, spans) = receiver().await;
    let endpoint = format!("http://{collector}");
    let tier = |name: &str, args: &[&str]| {
        let args: Vec<&str> = args.iter().copied().chain(["--otlp-endpoint", &endpoint]).collect();
        server(&args).metrics().env(QUICK_EXPORT.0, QUICK_EXPORT.1).env("OTEL_SERVICE_NAME", name).spawn()
    };
    let (generator, ranker) =
        (tier("generator", &["--services", "generator"]), tier("ranker", &["--services", "ranker"]));
    let (generator, ranker) = (generator.ready().await, ranker.ready().await);
    let (g, r) = (format!("http://{}", generator.addr()), format!("http://{}", ranker.addr()));
    let cascade = tier(
        "cascade",
        &[
            "--services",
            "cascade",
            "--generator-endpoint",
            &g,
            "--ranker-endpoint",
            &r,
            "--upstream-check-interval-ms",
            "100",
        ],
    )
    .ready()
    .await;
    let ch = channel(&cascade).await;
    // The cascade serves once its health checks have seen both upstreams serving.
    let start = Instant::now();
    let check = || HealthCheckRequest { service: "caption.v1.Cascade".into() };
    while HealthClient::new(ch.clone()).check(check()).await.unwrap().into_inner().status
        != ServingStatus::Serving as i32
    {
        assert!(start.elapsed() < Duration::from_secs(60), "the cascade never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scene = draw_scene(&mut StdRng::seed_from_u64(6));
    let answer = CascadeClient::new(ch).caption(traced(caption(scene.png()))).await.unwrap().into_inner();

    let key = answer.key.as_str();
    let call = |process: &'static str, service: &'static str| {
        move |s: &Received| {
            s.process == process
                && s.span.name == "call"
                && s.attr("service").as_deref() == Some(service)
                && s.attr("key").as_deref() == Some(key)
        }
    };
    let top = wait_for_span(&spans, "of the cascade's call", call("cascade", "Caption")).await;
    assert_eq!((hex(&top.span.trace_id), hex(&top.span.parent_span_id)), (TRACE_ID.into(), PARENT_ID.into()));
    for (process, service) in [("generator", "Generate"), ("ranker", "Rank")] {
        // An attempt is a child of the call.
        let hop = wait_for_span(&spans, &format!("of the cascade's {service} call"), |s| {
            s.process == "cascade"
                && s.span.name == "upstream"
                && s.attr("upstream").as_deref() == Some(service)
                && s.span.parent_span_id == top.span.span_id
        })
        .await;
        assert_eq!(hop.span.trace_id, top.span.trace_id);
        let remote = wait_for_span(&spans, &format!("of the {process}'s call"), call(process, service)).await;
        assert_eq!(hex(&remote.span.trace_id), TRACE_ID, "{process}: the same trace");
        assert_eq!(remote.span.parent_span_id, hop.span.span_id, "{process}: a child of the cascade's attempt");
        assert_eq!(remote.attr("sent_key").as_deref(), Some(key), "{process}: the key it was sent");
    }
    // The hop's own count, by gRPC's canonical code names.
    let metrics = reqwest::get(format!("http://{}/metrics", cascade.metrics())).await.unwrap().text().await.unwrap();
    for service in ["Generate", "Rank"] {
        let line = format!("caption_upstream_requests_total{{service=\"{service}\",code=\"OK\"}} 1");
        assert!(metrics.lines().any(|l| l == line), "no {line}:\n{metrics}");
    }
}

#[tokio::test]
async fn spans_not_yet_sent_are_flushed_when_the_server_stops() {
    let (collector, spans) = receiver().await;
    // The default five seconds between exports: only the flush at exit can send the span in time.
    let mut process = server(&["--otlp-endpoint", &format!("http://{collector}")]).start().await;
    let mut cascade = CascadeClient::new(channel(&process).await);
    let scene = draw_scene(&mut StdRng::seed_from_u64(7));
    let answer = cascade.caption(traced(caption(scene.png()))).await.unwrap().into_inner();
    drop(cascade);
    let sent = std::process::Command::new("kill").args(["-TERM", &process.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let start = Instant::now();
    while process.child().try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(4), "the server did not stop in time:\n{}", process.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exported = spans.lock().unwrap().iter().any(|s| s.attr("key").as_deref() == Some(answer.key.as_str()));
    assert!(exported, "the call's span was not exported before the server exited:\n{}", process.log());
}
