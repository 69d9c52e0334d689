//! gRPC adapters: proto ⇄ domain conversion, the one error → status mapping, observing calls,
//! and the server with health checking, reflection, token auth and its network edge. No tensors
//! here.

pub mod auth;
mod captioning;
pub mod convert;
pub mod edge;
pub mod error;
mod message_limit;
mod observe;
pub mod server;
mod services;
mod stream;

pub use captioning::Captioning;
pub use server::{serve, Backends, Reflection, Roles, ServerOptions};
pub use stream::StreamLimits;
