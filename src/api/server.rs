//! The gRPC server: the three services, grpc.health.v1 and reflection (v1 and v1alpha) behind the
//! bearer-token check and the message limit, served by [`edge`](super::edge), with a graceful
//! shutdown that reports NOT_SERVING while draining.

use std::{convert::Infallible, future::Future, sync::Arc};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::{net::TcpListener, sync::watch};
use tonic::{body::Body, service::Routes};
use tonic_health::ServingStatus;
use tower::ServiceExt;

use super::{
    auth::BearerAuth,
    captioning::Captioning,
    edge,
    message_limit::MessageLimit,
    services::Services,
    stream::{StreamLimits, Streams},
};
use crate::{cascade::Captioner, pb};

/// Largest gRPC message accepted (inline image bytes travel in one).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

const SERVICE_NAMES: [&str; 3] = ["caption.v1.Generator", "caption.v1.Ranker", "caption.v1.Cascade"];

/// Where reflection is served.
pub enum Reflection {
    Off,
    /// Beside the services, on the main listener.
    Main,
    /// On a listener of its own (say, one reachable only from inside the cluster).
    Separate(TcpListener),
}

/// Everything about serving except the models.
pub struct ServerOptions {
    pub max_message_bytes: usize,
    pub streams: StreamLimits,
    pub edge: edge::EdgeConfig,
    /// Calls other than health checks must carry one of these tokens when set.
    pub auth: Option<BearerAuth>,
    pub reflection: Reflection,
    /// A second listener serving only grpc.health.v1, in plaintext and without a token: for
    /// Kubernetes probes, which speak neither TLS nor bearer tokens.
    pub health_listener: Option<TcpListener>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: MAX_MESSAGE_BYTES,
            streams: StreamLimits::default(),
            edge: edge::EdgeConfig::default(),
            auth: None,
            reflection: Reflection::Main,
            health_listener: None,
        }
    }
}

/// Reflection over our services and health, for either protocol version.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

fn add_reflection(routes: &mut tonic::service::RoutesBuilder) {
    routes
        .add_service(reflection().build_v1().expect("embedded descriptor set is valid"))
        .add_service(reflection().build_v1alpha().expect("embedded descriptor set is valid"));
}

/// Which services a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub generator: bool,
    pub ranker: bool,
    pub cascade: bool,
}

impl Roles {
    pub const ALL: Self = Self { generator: true, ranker: true, cascade: true };
}

/// Which services a process serves, and what answers them.
pub struct Backends {
    pub roles: Roles,
    pub captioning: Captioning,
}

/// All three services over the models in this process.
impl From<Arc<Captioner>> for Backends {
    fn from(local: Arc<Captioner>) -> Self {
        Self { roles: Roles::ALL, captioning: Captioning::Local(local) }
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains in-flight calls (bounded by the
/// edge's drain period) and returns once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    backends: impl Into<Backends>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let Backends { roles, captioning } = backends.into();
    let upstreams_ready = match &captioning {
        Captioning::Remote(chain) => Some(chain.upstreams().ready()),
        Captioning::Local(_) => None,
    };
    let services = Services { captioning, streams: Streams::new(options.streams) };
    let limit = options.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    let served: Vec<&'static str> =
        [(roles.generator, SERVICE_NAMES[0]), (roles.ranker, SERVICE_NAMES[1]), (roles.cascade, SERVICE_NAMES[2])]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
    for name in served.iter().copied().chain([""]) {
        // A cascade over remote models is SERVING only while both have a SERVING replica. The
        // server's own status ("") does not follow them: liveness probes read it, and a cascade
        // pod is alive while its upstreams restart.
        let waits = name == SERVICE_NAMES[2] && upstreams_ready.is_some();
        let status = if waits { ServingStatus::NotServing } else { ServingStatus::Serving };
        health.set_service_status(name, status).await;
    }
    let mut routes = Routes::builder();
    routes.add_service(health_service.clone());
    if roles.generator {
        routes
            .add_service(pb::generator_server::GeneratorServer::new(services.clone()).max_decoding_message_size(limit));
    }
    if roles.ranker {
        routes.add_service(pb::ranker_server::RankerServer::new(services.clone()).max_decoding_message_size(limit));
    }
    if roles.cascade {
        routes.add_service(pb::cascade_server::CascadeServer::new(services).max_decoding_message_size(limit));
    }
    // Listeners besides the main one, each with its own routes and edge.
    let mut sides = Vec::new();
    match options.reflection {
        Reflection::Off => {}
        Reflection::Main => add_reflection(&mut routes),
        Reflection::Separate(listener) => {
            let mut routes = Routes::builder();
            add_reflection(&mut routes);
            sides.push((listener, guarded(routes.routes(), options.auth.clone(), limit), options.edge.clone()));
        }
    }
    if let Some(listener) = options.health_listener {
        let plain = edge::EdgeConfig { tls: None, ..options.edge.clone() };
        sides.push((listener, guarded(Routes::new(health_service), None, limit), plain));
    }

    // One shutdown for every listener; health turns NOT_SERVING before the drain begins.
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some([generator, ranker]) = upstreams_ready {
        tokio::spawn(follow_upstreams(health.clone(), generator, ranker, stop_rx.clone()));
    }
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        for name in served.iter().copied().chain([""]) {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
        tracing::info!("shutting down: draining in-flight calls");
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let sides: Vec<_> = sides
        .into_iter()
        .map(|(listener, service, edge)| tokio::spawn(edge::serve(listener, service, edge, stopped(stop_rx.clone()))))
        .collect();
    let service = guarded(routes.routes(), options.auth, limit);
    edge::serve(listener, service, options.edge, stopped(stop_rx)).await;
    for side in sides {
        let _ = side.await;
    }
}

/// Keeps the Cascade service's health SERVING exactly while both upstreams have a SERVING
/// replica, until shutdown.
async fn follow_upstreams(
    health: tonic_health::server::HealthReporter,
    mut generator: watch::Receiver<bool>,
    mut ranker: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let up = *generator.borrow_and_update() && *ranker.borrow_and_update();
        let status = if up { ServingStatus::Serving } else { ServingStatus::NotServing };
        health.set_service_status(SERVICE_NAMES[2], status).await;
        if *stop.borrow() {
            // Shutdown came while this was being set: it has the last word.
            health.set_service_status(SERVICE_NAMES[2], ServingStatus::NotServing).await;
            return;
        }
        tokio::select! {
            r = generator.changed() => if r.is_err() { return },
            r = ranker.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// The routes behind the token check and the message limit, both answered before any handler runs.
fn guarded(
    routes: Routes,
    auth: Option<BearerAuth>,
    max_message_bytes: usize,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<Incoming>| {
        let routes = routes.clone();
        let refused = auth.as_ref().and_then(|token| token.check(&req).err());
        async move {
            if let Some(status) = refused {
                return Ok(status.into_http());
            }
            routes.oneshot(req.map(|body| MessageLimit::new(body, max_message_bytes))).await
        }
    })
}
