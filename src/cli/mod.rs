//! The `caption-cascade` command line: `serve` and `caption`.

mod caption;
mod models;
mod ready;
mod serve;

use clap::{Parser, Subcommand};

/// Caption images with a BLIP → CLIP cascade, as a gRPC service or from the command line.
#[derive(Debug, Parser)]
#[command(name = "caption-cascade", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Boxed: the flag structs are large and a command is parsed once.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Generator, Ranker and Cascade gRPC services (plus health and reflection).
    Serve(Box<serve::ServeArgs>),
    /// Caption images or URLs: BLIP writes candidates, CLIP ranks them, the best are printed.
    Caption(Box<caption::CaptionArgs>),
    /// Manage checkpoint folders.
    Models(models::ModelsArgs),
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Caption(args) => caption::run(*args).await,
        Command::Models(args) => models::run(args).await,
    }
}
