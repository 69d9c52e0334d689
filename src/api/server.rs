//! The gRPC server: the three services, grpc.health.v1 and reflection (v1 and v1alpha), bound to
//! a listener, with graceful shutdown that reports NOT_SERVING while draining.

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::{pb, services::Services};
use crate::cascade::Cascade;

/// Largest gRPC message accepted (inline image bytes travel in one).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

const SERVICE_NAMES: [&str; 3] = ["caption.v1.Generator", "caption.v1.Ranker", "caption.v1.Cascade"];

/// Reflection over our services and health, for either protocol version.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Serves on `listener` until `shutdown` resolves, then drains in-flight calls.
pub async fn serve(
    listener: TcpListener,
    cascade: Arc<Cascade>,
    max_message_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let services = Services { cascade };
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    let reflection_v1 = reflection().build_v1().expect("embedded descriptor set is valid");
    let reflection_v1alpha = reflection().build_v1alpha().expect("embedded descriptor set is valid");
    let drain_health = health.clone();
    let shutdown = async move {
        shutdown.await;
        for name in SERVICE_NAMES.into_iter().chain([""]) {
            drain_health.set_service_status(name, ServingStatus::NotServing).await;
        }
        tracing::info!("shutting down: draining in-flight calls");
    };
    Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::generator_server::GeneratorServer::new(services.clone()).max_decoding_message_size(max_message_bytes),
        )
        .add_service(
            pb::ranker_server::RankerServer::new(services.clone()).max_decoding_message_size(max_message_bytes),
        )
        .add_service(pb::cascade_server::CascadeServer::new(services).max_decoding_message_size(max_message_bytes))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
