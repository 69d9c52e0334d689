//! `caption-cascade serve`.

use clap::Args;
use tokio::net::TcpListener;

use crate::{
    cascade::{Cascade, ImageSource},
    config::{EngineArgs, ServerArgs},
    engine::Admission,
};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.server.metrics_listen {
        crate::telemetry::install_exporter(addr)?;
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    let engine = args.engine.clone();
    let cascade = tokio::task::spawn_blocking(move || crate::app::build_cascade(&engine)).await??;
    warm_up(&cascade).await?;
    let listener = TcpListener::bind(args.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.server.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving caption.v1 (Generator, Ranker, Cascade), health and reflection");
    crate::api::serve(listener, cascade.clone(), args.server.max_message_bytes, shutdown_signal()).await?;
    let scheduler = cascade.models().scheduler.clone();
    tokio::task::spawn_blocking(move || scheduler.shutdown()).await?;
    Ok(())
}

/// One tiny cascade call, so the first real request does not pay for lazy initialisation and a
/// broken model fails at start rather than on traffic.
pub async fn warm_up(cascade: &Cascade) -> anyhow::Result<()> {
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128])).write_to(&mut png, image::ImageFormat::Png)?;
    let mut params = cascade.default_params();
    params.num_candidates = 2;
    params.max_length = params.max_length.min(4);
    cascade
        .caption(ImageSource::Bytes(png.into_inner().into()), params, 1, Admission::default())
        .await
        .map_err(|e| anyhow::anyhow!("warm-up failed: {e}"))?;
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
