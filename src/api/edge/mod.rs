//! The network edge under the gRPC routes: our own accept loop (connection limit, accept
//! back-off), TLS, HTTP/2 settings, per-connection timeouts and the bounded drain on shutdown.
//! tonic's own server has no connection limit, first-request timeout or TLS reload, and answers
//! expired deadlines itself with CANCELLED, so the routes are served here with hyper directly.

mod conn;
pub mod tls;

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use metrics::{counter, gauge};
use tokio::{net::TcpListener, sync::watch, task::JoinSet, time::Instant};

pub use tls::TlsFiles;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How connections are accepted, kept and closed.
#[derive(Clone)]
pub struct EdgeConfig {
    /// Open connections at most; further ones are closed as soon as they are accepted.
    pub max_connections: usize,
    /// From accept to the first request's headers (TLS handshake and HTTP/2 preface included).
    pub handshake_timeout: Duration,
    /// A connection with no call in flight for this long is sent GOAWAY and closed.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval, and how long an unanswered PING may wait before the connection closes.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// Calls at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Largest request header block, in bytes.
    pub max_header_list_size: u32,
    /// After shutdown begins, in-flight calls get this long before their connections are closed.
    pub drain_timeout: Duration,
    /// Serve TLS with these files (reloaded when they change) instead of plaintext.
    pub tls: Option<Arc<TlsFiles>>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 256,
            max_header_list_size: 16 * 1024,
            drain_timeout: Duration::from_secs(25),
            tls: None,
        }
    }
}

/// The first accept error waits this long before the next accept; each further one doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `service` on `listener` until `shutdown` resolves, then stops accepting, sends GOAWAY
/// on every connection, closes idle ones at once and gives in-flight calls `drain_timeout` before
/// closing what is left. Returns once every connection is closed.
pub async fn serve<S, B>(listener: TcpListener, service: S, config: EdgeConfig, shutdown: impl Future<Output = ()>)
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let config = Arc::new(config);
    // `Some(deadline)` once draining: every connection closes by then at the latest.
    let (drain_tx, drain_rx) = watch::channel(None::<Instant>);
    let mut connections = JoinSet::new();
    let mut backoff = Duration::ZERO;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {
                gauge!("caption_connections").set(connections.len() as f64);
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    backoff = Duration::ZERO;
                    if connections.len() >= config.max_connections {
                        // Closed at once, so the caller learns now rather than at its deadline.
                        counter!("caption_connections_rejected_total").increment(1);
                        drop(tcp);
                        continue;
                    }
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(conn::run(tcp, service.clone(), config.clone(), drain_rx.clone()));
                    gauge!("caption_connections").set(connections.len() as f64);
                }
                Err(e) => {
                    // Out of file descriptors (or memory) an accept fails at once again: without a
                    // pause the loop would spin a core and starve the calls being served.
                    backoff = (backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                    counter!("caption_accept_errors_total").increment(1);
                    if backoff == MAX_BACKOFF || backoff == FIRST_BACKOFF {
                        tracing::warn!(error = %e, pause_ms = backoff.as_millis() as u64, "accept failed");
                    }
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
    // Closing the listening socket now makes new callers fail fast and go to another replica.
    drop(listener);
    let deadline = Instant::now() + config.drain_timeout;
    let _ = drain_tx.send(Some(deadline));
    tracing::info!(connections = connections.len(), "draining connections");
    // Connections close themselves by the deadline; the margin only guards against a stuck task.
    let all_closed = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline + Duration::from_secs(1), all_closed).await.is_err() {
        tracing::warn!(left = connections.len(), "connections still open after the drain period: closing them");
        connections.shutdown().await;
    }
    gauge!("caption_connections").set(0.0);
}
