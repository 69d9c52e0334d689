//! gRPC adapters: proto ⇄ domain conversion, field validation, the one error → status mapping,
//! and the server with health checking, reflection, token auth and its network edge. No tensors
//! here.

pub mod auth;
pub mod convert;
pub mod edge;
pub mod error;
mod message_limit;
pub mod pb;
pub mod server;
mod services;
mod stream;

pub use server::{serve, Backends, Reflection, Roles, ServerOptions};
