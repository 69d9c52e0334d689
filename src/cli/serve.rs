//! `caption-cascade serve`: one binary, its roles chosen by flags (all three services with both
//! models, or one tier of a split deployment).

use clap::Args;
use tokio::net::TcpListener;

use super::ready;
use crate::{
    api::{Backends, Captioning, Reflection, Roles, ServerOptions},
    app::ModelSet,
    cascade::{Captioner, ImageSource},
    config::{EngineArgs, PolicyArgs, ServerArgs, Service},
    engine::Admission,
    upstream::{RemoteUpstreams, UpstreamSpec},
    validate::SeedOrigin,
};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ready_file = args.server.ready_file.as_deref();
    if let Some(path) = ready_file {
        ready::clear(path)?;
    }
    let metrics = match args.server.metrics_listen {
        Some(addr) => {
            let addr = crate::telemetry::install_exporter(bind("--metrics-listen", addr).await?)?;
            tracing::info!(%addr, "serving Prometheus metrics");
            Some(addr)
        }
        None => None,
    };
    let plan = Plan::of(&args.server)?;
    let results = args.server.result_cache();
    let policy = args.policy.policy();
    let captioning = match plan.upstreams {
        Some((generator, ranker)) => {
            let interval = args.server.upstream_check_interval();
            let token = args.server.upstream_token().map_err(anyhow::Error::msg)?;
            let upstreams = RemoteUpstreams::start(generator, ranker, token, interval)?;
            let timeout = args.server.upstream_timeout();
            Captioning::Remote(crate::app::build_chain(&args.engine, &policy, upstreams, results, timeout)?)
        }
        None => {
            let (engine, models) = (args.engine.clone(), plan.models);
            let captioner = tokio::task::spawn_blocking(move || {
                crate::app::build_captioner_with(&engine, &policy, models, results)
            })
            .await??;
            warm_up(&captioner).await?;
            Captioning::Local(captioner)
        }
    };
    let listener = bind("--listen", args.server.listen).await?;
    let reflection = match args.server.reflection_listen {
        _ if args.server.no_reflection => Reflection::Off,
        Some(addr) => Reflection::Separate(bind("--reflection-listen", addr).await?),
        None => Reflection::Main,
    };
    let health_listener = match args.server.health_listen {
        Some(addr) => Some(bind("--health-listen", addr).await?),
        None => None,
    };
    let bound = ready::Bound {
        grpc: listener.local_addr()?,
        metrics,
        health: health_listener.as_ref().map(TcpListener::local_addr).transpose()?,
        reflection: match &reflection {
            Reflection::Separate(listener) => Some(listener.local_addr()?),
            _ => None,
        },
    };
    let options = ServerOptions {
        max_message_bytes: args.server.max_message_bytes.usize(),
        streams: args.server.stream_limits(),
        edge: args.server.edge_config().map_err(anyhow::Error::msg)?,
        auth: args.server.auth().map_err(anyhow::Error::msg)?,
        reflection,
        health_listener,
    };
    let shown = |addr: Option<std::net::SocketAddr>| addr.map(tracing::field::display);
    tracing::info!(
        grpc = %bound.grpc,
        metrics = shown(bound.metrics),
        health = shown(bound.health),
        reflection = shown(bound.reflection),
        services = ?args.server.services,
        remote_models = matches!(captioning, Captioning::Remote(_)),
        tls = options.edge.tls.is_some(),
        token = options.auth.is_some(),
        "serving caption.v1 and health"
    );
    let local = match &captioning {
        Captioning::Local(captioner) => Some(captioner.clone()),
        Captioning::Remote(_) => None,
    };
    if let Some(path) = ready_file {
        ready::write(path, &bound)?;
    }
    crate::api::serve(listener, Backends { roles: plan.roles, captioning }, options, shutdown_signal()).await;
    if let Some(path) = ready_file {
        // The addresses no longer answer; a supervisor reading the file would be misled.
        let _ = std::fs::remove_file(path);
    }
    if let Some(captioner) = local {
        let scheduler = captioner.models().scheduler.clone();
        tokio::task::spawn_blocking(move || scheduler.shutdown()).await?;
    }
    Ok(())
}

/// What a process runs, from its flags: the services, the models they need here, and the
/// upstreams of a cascade whose models are elsewhere.
struct Plan {
    roles: Roles,
    models: ModelSet,
    upstreams: Option<(UpstreamSpec, UpstreamSpec)>,
}

impl Plan {
    fn of(server: &ServerArgs) -> anyhow::Result<Self> {
        let has = |s: Service| server.services.contains(&s);
        let roles =
            Roles { generator: has(Service::Generator), ranker: has(Service::Ranker), cascade: has(Service::Cascade) };
        if !(roles.generator || roles.ranker || roles.cascade) {
            anyhow::bail!("--services: name at least one of generator, ranker, cascade");
        }
        let ca = server.upstream_ca.as_deref();
        let spec = |list: &Option<String>| list.as_deref().map(|l| UpstreamSpec::parse(l, ca)).transpose();
        let (generator, ranker) = (
            spec(&server.generator_endpoint).map_err(anyhow::Error::msg)?,
            spec(&server.ranker_endpoint).map_err(anyhow::Error::msg)?,
        );
        let upstreams = match (roles.cascade, generator, ranker) {
            (true, Some(g), Some(r)) if !roles.generator && !roles.ranker => Some((g, r)),
            (true, None, None) if roles.generator && roles.ranker => None,
            (false, None, None) => None,
            (false, _, _) => {
                anyhow::bail!("--generator-endpoint and --ranker-endpoint are for a process serving cascade")
            }
            _ => anyhow::bail!(
                "a cascade runs both models here (--services generator,ranker,cascade) or neither, with \
                 --generator-endpoint and --ranker-endpoint naming where they run"
            ),
        };
        let models = ModelSet { generator: roles.generator, ranker: roles.ranker };
        Ok(Self { roles, models, upstreams })
    }
}

async fn bind(flag: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("{flag}: cannot listen on {addr}: {e}"))
}

/// One tiny call to each model this process runs, so the first real request does not pay for
/// lazy initialisation and a broken model fails at start rather than on traffic.
pub async fn warm_up(captioner: &Captioner) -> anyhow::Result<()> {
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128])).write_to(&mut png, image::ImageFormat::Png)?;
    let image = ImageSource::Bytes(png.into_inner().into());
    let (models, validator) = (captioner.models(), captioner.validator());
    let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("warm-up failed: {e}");
    if models.blip.is_some() {
        let mut params = validator.defaults().clone();
        params.num_candidates = 2;
        params.max_length = params.max_length.min(4);
        let params = validator.params(params, SeedOrigin::Server).map_err(|e| failed(&e))?;
        captioner.generate(image.clone(), params, Admission::default()).await.map_err(|e| failed(&e.error))?;
    }
    if models.clip.is_some() {
        let captions = validator.captions(vec!["a grey square".into()]).map_err(|e| failed(&e))?;
        captioner.rank(image, captions, Admission::default()).await.map_err(|e| failed(&e.error))?;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
