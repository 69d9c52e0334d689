//! The `caption-cascade` command line: `serve`, `caption` and `models`, and the log and trace
//! flags every one of them takes.

mod caption;
mod models;
mod ready;
mod serve;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat, LogLevel};

/// Caption images with a BLIP → CLIP cascade, as a gRPC service or from the command line.
#[derive(Debug, Parser)]
#[command(name = "caption-cascade", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Logs and traces, the same for every subcommand.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Logs and traces")]
pub struct TelemetryArgs {
    /// How stderr's log lines are written: `text` (coloured on a terminal only, never under
    /// NO_COLOR) or `json` (one object per line).
    #[arg(long, global = true, env = "CAPTION_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The least severe lines logged (debug and trace: this program's own only). RUST_LOG, when
    /// set, wins: its directives can name any module.
    #[arg(long, global = true, env = "CAPTION_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Export traces over OTLP/gRPC to this collector (http://HOST:PORT or HOST:PORT, plaintext).
    /// Off when unset.
    #[arg(long, global = true, env = "CAPTION_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    /// Installs the log and, when asked for, the trace exporter (from within the runtime).
    pub fn install(&self) -> anyhow::Result<telemetry::Telemetry> {
        telemetry::install(&telemetry::Settings {
            log_format: self.log_format,
            log_level: self.log_level,
            otlp_endpoint: self.otlp_endpoint.as_deref().map(|e| crate::upstream::endpoint_url(e, false)),
        })
    }
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
