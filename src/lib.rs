//! caption-cascade: a gRPC serving backend that captions images with a cascade of two models.
//! BLIP writes candidate captions, CLIP ranks them.
//!
//! Layers, top to bottom: [`cli`] → [`app`] (assembly from [`config`]'s settings) → [`api`]
//! (gRPC adapters) → [`upstream`] (the client of remote tiers) → [`cascade`] (use cases) →
//! [`engine`] (shared batching scheduler) → [`backend`] (model runners) → [`validate`] (requests
//! into checked values) → [`models`] (BLIP, CLIP, generation) and [`images`] (fetch, cache;
//! decoding and resizing in the `caption-images` crate); beneath them all [`lru`], the
//! byte-bounded store and coalesced loads the caches are built on, and [`watched`], the files read
//! again when they change (TLS, tokens). [`pb`], the wire contract, is spoken by every layer that
//! talks to the outside.

pub mod api;
pub mod app;
pub mod backend;
pub mod cascade;
pub mod cli;
pub mod config;
pub mod engine;
pub mod hub;
pub mod images;
#[cfg(test)]
mod layering;
pub mod lru;
pub mod models;
pub mod pb;
pub mod telemetry;
pub mod upstream;
pub mod validate;
pub mod watched;
