//! gRPC adapters: proto ⇄ domain conversion, field validation, the one error → status mapping,
//! and the server with health checking and reflection. No tensors here.

pub mod convert;
pub mod error;
pub mod pb;
pub mod server;
mod services;

pub use server::serve;
