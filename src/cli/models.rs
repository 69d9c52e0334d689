//! `caption-cascade models pull`: fetch a published checkpoint folder.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::hub::{pull, PullRequest};

#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download a BLIP or CLIP checkpoint folder from the Hugging Face Hub into the models directory.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Hub id, e.g. Salesforce/blip-image-captioning-base or openai/clip-vit-base-patch32.
    pub repo_id: String,
    /// Branch, tag or commit to pull.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Folder that receives the checkpoint folder (named after the repository).
    #[arg(long, env = "CAPTION_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Hub cache directory (default: the hub's own, from HF_HOME).
    #[arg(long, env = "HF_HUB_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Hub address (a mirror); default https://huggingface.co.
    #[arg(long, env = "HF_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Use only files already in the hub cache; never touch the network.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = clap::builder::FalseyValueParser::new())]
    pub offline: bool,
}

pub async fn run(args: ModelsArgs) -> anyhow::Result<()> {
    match args.command {
        ModelsCommand::Pull(a) => {
            let req = PullRequest {
                repo_id: a.repo_id,
                revision: a.revision,
                models_dir: a.models_dir,
                cache_dir: a.cache_dir,
                endpoint: a.endpoint,
                offline: a.offline,
            };
            let folder = pull(&req).await?;
            println!("{}", folder.display());
            Ok(())
        }
    }
}
