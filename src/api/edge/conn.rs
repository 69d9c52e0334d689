//! One connection's life: the TLS handshake, HTTP/2 served by hyper, and the timers that close it
//! (no first request in time, idle too long, shutdown).

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::counter;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{watch, Notify},
    time::Instant,
};
use tower::ServiceExt;

use super::{BoxError, EdgeConfig};

/// After GOAWAY, how long a connection with nothing in flight may take to close on its own.
const GOAWAY_GRACE: Duration = Duration::from_millis(500);

pub(super) async fn run<S, B>(
    tcp: TcpStream,
    service: S,
    config: Arc<EdgeConfig>,
    mut drain: watch::Receiver<Option<Instant>>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let first_request_by = Instant::now() + config.handshake_timeout;
    let Some(tls) = &config.tls else {
        return serve(tcp, service, &config, drain, first_request_by).await;
    };
    let handshake = tokio::time::timeout_at(first_request_by, tls.acceptor().accept(tcp));
    tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => serve(stream, service, &config, drain, first_request_by).await,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                closed("tls_error");
            }
            Err(_) => closed("handshake_timeout"),
        },
        _ = drain.changed() => closed("drain"),
    }
}

fn closed(reason: &'static str) {
    counter!("caption_connections_closed_total", "reason" => reason).increment(1);
}

async fn serve<I, S, B>(
    io: I,
    service: S,
    config: &EdgeConfig,
    mut drain: watch::Receiver<Option<Instant>>,
    first_request_by: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new());
    let tracked = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let call = Call::begin(&activity);
            let response = service.clone().oneshot(req);
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| Tracked { body, _call: call }))
            }
        })
    };
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(config.max_header_list_size);
    let conn = http2.serve_connection(TokioIo::new(io), tracked);
    tokio::pin!(conn);

    // Set once GOAWAY is sent: the connection is closed by then whatever is left on it.
    let mut close_by: Option<(Instant, &'static str)> = None;
    let mut draining = false;
    loop {
        // Registered before the state is read, so a change in between still wakes us.
        let changed = activity.changed.notified();
        let (in_flight, seen, idle_since) = activity.snapshot();
        let idle_by = match (close_by, in_flight) {
            (None, 0) if !seen => Some((first_request_by, "handshake_timeout")),
            (None, 0) => Some((idle_since + config.idle_timeout, "idle")),
            _ => None,
        };
        let wake = close_by.or(idle_by);
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = changed => {}
            _ = drain.changed(), if !draining => {
                draining = true;
                let deadline = (*drain.borrow()).unwrap_or_else(Instant::now);
                conn.as_mut().graceful_shutdown();
                // Idle connections go at once; those with calls keep them until the deadline.
                let by = if in_flight == 0 { Instant::now() + GOAWAY_GRACE } else { deadline };
                close_by = Some((by.min(deadline), "drain"));
            }
            _ = tokio::time::sleep_until(wake.map_or_else(Instant::now, |(at, _)| at)), if wake.is_some() => {
                let (_, reason) = wake.expect("guarded");
                if close_by.is_some() || !seen {
                    // Nothing was ever asked, or GOAWAY was not enough: close the socket.
                    closed(reason);
                    return;
                }
                conn.as_mut().graceful_shutdown();
                closed(reason);
                close_by = Some((Instant::now() + GOAWAY_GRACE, reason));
            }
        }
    }
}

/// Calls in flight on one connection, and since when it has had none.
struct Activity {
    state: Mutex<ActivityState>,
    changed: Notify,
}

struct ActivityState {
    in_flight: usize,
    seen: bool,
    idle_since: Instant,
}

impl Activity {
    fn new() -> Self {
        let state = ActivityState { in_flight: 0, seen: false, idle_since: Instant::now() };
        Self { state: Mutex::new(state), changed: Notify::new() }
    }

    fn snapshot(&self) -> (usize, bool, Instant) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.in_flight, s.seen, s.idle_since)
    }
}

/// One call on a connection, from its headers until its response body is done or dropped.
struct Call(Arc<Activity>);

impl Call {
    fn begin(activity: &Arc<Activity>) -> Self {
        {
            let mut s = activity.state.lock().unwrap_or_else(|e| e.into_inner());
            s.in_flight += 1;
            s.seen = true;
        }
        activity.changed.notify_waiters();
        Self(activity.clone())
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        {
            let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            s.in_flight -= 1;
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
            }
        }
        self.0.changed.notify_waiters();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call counted as in flight until it is finished.
    struct Tracked<B> {
        #[pin]
        body: B,
        _call: Call,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
