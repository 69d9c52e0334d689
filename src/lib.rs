//! caption-cascade: a gRPC serving backend that captions images with a cascade of two models.
//! BLIP writes candidate captions, CLIP ranks them.
//!
//! Layers, top to bottom: [`cli`] → [`api`] (gRPC adapters) → [`cascade`] (use cases) →
//! [`engine`] (shared batching scheduler) → [`backend`] (model runners) → [`models`] (BLIP, CLIP,
//! generation) and [`images`] (fetch, cache; decoding and resizing in the `caption-images`
//! crate); beneath them all [`lru`], the byte-bounded store and coalesced loads the caches are
//! built on. [`app`] assembles them from [`config`]'s settings.

pub mod api;
pub mod app;
pub mod backend;
pub mod cascade;
pub mod cli;
pub mod config;
pub mod engine;
pub mod hub;
pub mod images;
pub mod lru;
pub mod models;
pub mod telemetry;
pub mod upstream;
