//! The `/metrics` HTTP endpoint: the recorder's Prometheus text over HTTP/1.1 on a listener bound
//! by the caller (the exporter crate's own listener binds by itself and cannot say which port 0
//! gave it), and the recorder's periodic upkeep.

use std::{convert::Infallible, time::Duration};

use hyper::{
    body::Incoming,
    header::{HeaderValue, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// How often histograms are drained into their summaries, as the exporter crate's own listener
/// does it (its default), so their memory stays bounded between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Pause after a failed accept: out of file descriptors it fails again at once, and a scrape can
/// wait where a spinning loop would take a core from the calls being served.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The Prometheus text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4";

/// Serves the endpoint and runs the upkeep, both on the current tokio runtime, for the life of
/// the process.
pub(super) fn spawn(listener: TcpListener, handle: PrometheusHandle) {
    let upkept = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_INTERVAL).await;
            upkept.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, handle));
}

async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let mut failing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Once per run of failures: out of file descriptors it fails ten times a second.
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        failing = false;
        let handle = handle.clone();
        let service = service_fn(move |req| answer(handle.clone(), req));
        tokio::spawn(async move {
            // The timer gives hyper's header read timeout, so a silent peer does not hold a socket.
            let conn = http1::Builder::new().timer(TokioTimer::new()).serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics endpoint: connection ended");
            }
        });
    }
}

/// What the exporter crate's listener answered: `/health` says OK, any other path the metrics.
async fn answer(handle: PrometheusHandle, req: Request<Incoming>) -> Result<Response<String>, Infallible> {
    if req.uri().path() == "/health" {
        return Ok(text(StatusCode::OK, "OK".into(), "text/plain"));
    }
    // Rendering walks every series: off the threads that serve gRPC.
    Ok(match tokio::task::spawn_blocking(move || handle.render()).await {
        Ok(body) => text(StatusCode::OK, body, TEXT_FORMAT),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering the metrics failed: {e}\n"), "text/plain"),
    })
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
