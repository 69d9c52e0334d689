//! Checkpoint folders from the Hugging Face Hub: downloads (or takes from the local hub cache,
//! offline) the files a BLIP or CLIP folder needs, and lays them out as published, or names the
//! hub cache's own snapshot folder of them.

use std::path::{Path, PathBuf};

use hf_hub::{api::tokio::ApiBuilder, Cache, Repo, RepoType};

/// Files a checkpoint folder is made of; the first three are required.
const REQUIRED: [&str; 3] = ["config.json", "preprocessor_config.json", "tokenizer.json"];
const OPTIONAL: [&str; 4] = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "vocab.txt"];
/// Weight files, in order of preference: the first one the repository has is fetched.
const WEIGHTS: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

#[derive(Debug, Clone)]
pub struct PullRequest {
    /// Hub id, e.g. `Salesforce/blip-image-captioning-base`.
    pub repo_id: String,
    pub revision: String,
    /// Parent folder of the checkpoint folder to write.
    pub models_dir: PathBuf,
    /// Hub cache (default: `HF_HOME`/`HF_HUB_CACHE` as the hub's own tools use).
    pub cache_dir: Option<PathBuf>,
    /// Hub address (default: `HF_ENDPOINT` or https://huggingface.co).
    pub endpoint: Option<String>,
    /// Take the files from the cache only; never touch the network.
    pub offline: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{0:?} is not a hub id of the form owner/name")]
    BadId(String),
    #[error(
        "cannot reach the model hub at {endpoint} ({cause}); check the network, set HF_ENDPOINT to a mirror, \
         or pull with --offline from a populated hub cache"
    )]
    Unreachable { endpoint: String, cause: String },
    #[error("{repo} has no {file} (a BLIP or CLIP checkpoint folder needs it)")]
    MissingFile { repo: String, file: String },
    #[error("offline: {file} of {repo} is not in the hub cache at {cache}")]
    NotCached { repo: String, file: String, cache: String },
    #[error("{0}")]
    Io(String),
}

/// Pulls the checkpoint into `models_dir/<name>`; returns that folder.
pub async fn pull(req: &PullRequest) -> Result<PathBuf, PullError> {
    let name = repo_name(&req.repo_id)?;
    let target = req.models_dir.join(name);
    let files = fetch(req).await?;
    std::fs::create_dir_all(&target).map_err(|e| PullError::Io(format!("{}: {e}", target.display())))?;
    for (name, path) in files {
        let dest = target.join(&name);
        std::fs::copy(&path, &dest)
            .map_err(|e| PullError::Io(format!("{} → {}: {e}", path.display(), dest.display())))?;
    }
    Ok(target)
}

/// The hub cache's snapshot folder of the checkpoint: downloaded first unless cached (or, offline,
/// only from the cache). The hub's tools lay a snapshot out as the repository is, so the folder
/// loads as is, and a second start finds it without a copy. Blocking: the download runs on a
/// thread of its own, so this may be called from any thread, a runtime's included.
pub fn checkpoint(req: &PullRequest) -> Result<PathBuf, PullError> {
    repo_name(&req.repo_id)?;
    let req = req.clone();
    let fetched = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PullError::Io(e.to_string()))?;
        rt.block_on(fetch(&req))
    })
    .join()
    .map_err(|_| PullError::Io("the hub download thread panicked".into()))??;
    let snapshot = |path: &PathBuf| path.parent().map(Path::to_path_buf);
    let folder = fetched.iter().find(|(name, _)| name == REQUIRED[0]).and_then(|(_, p)| snapshot(p));
    // Every file of one revision lies in the same snapshot folder.
    match folder {
        Some(folder) if fetched.iter().all(|(_, p)| snapshot(p).as_ref() == Some(&folder)) => Ok(folder),
        _ => Err(PullError::Io("the hub cache holds this revision's files in more than one folder".into())),
    }
}

/// The files a checkpoint folder needs, as paths in the hub cache.
async fn fetch(req: &PullRequest) -> Result<Vec<(String, PathBuf)>, PullError> {
    let cache = req.cache_dir.clone().map_or_else(Cache::from_env, Cache::new);
    let repo = Repo::with_revision(req.repo_id.clone(), RepoType::Model, req.revision.clone());
    if req.offline {
        from_cache(&cache, &repo, req)
    } else {
        download(&cache, &repo, req).await
    }
}

/// The repository's name (`owner/name` → `name`), or why `repo_id` is no hub id.
fn repo_name(repo_id: &str) -> Result<&str, PullError> {
    repo_id
        .split_once('/')
        .map(|(_, n)| n)
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| PullError::BadId(repo_id.to_string()))
}

fn from_cache(cache: &Cache, repo: &Repo, req: &PullRequest) -> Result<Vec<(String, PathBuf)>, PullError> {
    let cached = cache.repo(repo.clone());
    let not_cached = |file: &str| PullError::NotCached {
        repo: req.repo_id.clone(),
        file: file.to_string(),
        cache: cache.path().display().to_string(),
    };
    let mut files = Vec::new();
    for f in REQUIRED {
        files.push((f.to_string(), cached.get(f).ok_or_else(|| not_cached(f))?));
    }
    files.extend(OPTIONAL.iter().filter_map(|f| cached.get(f).map(|p| (f.to_string(), p))));
    let weights =
        WEIGHTS.iter().find_map(|f| cached.get(f).map(|p| (f.to_string(), p))).ok_or_else(|| not_cached(WEIGHTS[0]))?;
    files.push(weights);
    Ok(files)
}

async fn download(cache: &Cache, repo: &Repo, req: &PullRequest) -> Result<Vec<(String, PathBuf)>, PullError> {
    let endpoint = req
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| "https://huggingface.co".into());
    // HF_TOKEN (as the Hub's own tools read it) for gated and private repos, else the cache's token file.
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()).or_else(|| cache.token());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_token(token)
        .with_endpoint(endpoint.clone())
        .with_progress(true)
        .build()
        .map_err(|e| PullError::Io(e.to_string()))?;
    let api = api.repo(repo.clone());
    let unreachable =
        |e: hf_hub::api::tokio::ApiError| PullError::Unreachable { endpoint: endpoint.clone(), cause: chain(&e) };
    let info = api.info().await.map_err(unreachable)?;
    let present: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let missing = |f: &str| PullError::MissingFile { repo: req.repo_id.clone(), file: f.to_string() };
    let mut wanted: Vec<&str> = Vec::new();
    for f in REQUIRED {
        if !present.contains(&f) {
            return Err(missing(f));
        }
        wanted.push(f);
    }
    wanted.extend(OPTIONAL.iter().filter(|f| present.contains(f)));
    wanted.push(WEIGHTS.iter().find(|f| present.contains(f)).ok_or_else(|| missing(WEIGHTS[0]))?);
    let mut files = Vec::new();
    for f in wanted {
        let path = api.get(f).await.map_err(unreachable)?;
        files.push((f.to_string(), path));
    }
    Ok(files)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// True when `folder` looks like a checkpoint folder this server can load.
pub fn is_checkpoint_folder(folder: &Path) -> bool {
    REQUIRED.iter().all(|f| folder.join(f).is_file()) && WEIGHTS.iter().any(|f| folder.join(f).is_file())
}
