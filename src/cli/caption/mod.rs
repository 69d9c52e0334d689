//! `caption-cascade caption`: the origin's bulk job. Images (paths or URLs, from arguments or a
//! list) are captioned concurrently, in-process or by a server over one CaptionStream call,
//! printed in the origin job's format (or merged, or as JSON), recorded in a resumable JSONL
//! file, with progress on stderr.

mod progress;
mod report;
mod runner;

use std::{
    collections::{BTreeMap, HashSet},
    io::BufRead,
    path::PathBuf,
    time::Instant,
};

use clap::Args;
use tokio::sync::mpsc;

use crate::{
    api::Captioning,
    cascade::ResultCacheConfig,
    config::{EngineArgs, Policy},
    models::generation::Strategy,
    pb, validate,
};
use progress::Progress;
use report::{Mode, Record};
use runner::{Done, Job, Remote, Shape, Target};

#[derive(Debug, Args)]
pub struct CaptionArgs {
    /// Image files or http(s) URLs to caption.
    #[arg(value_name = "IMAGE_OR_URL", required_unless_present = "input")]
    pub images: Vec<String>,
    /// A file listing images to caption, one path or URL per line (`-`: standard input); empty
    /// lines and lines starting with `#` are skipped.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Append one JSON object per image to this file (its result, or its error). A rerun with the
    /// same file skips the images it already holds a result for, and retries the failed ones.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Images in flight at once; enough to keep the batcher's batches full.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Call a running server at this address (HOST:PORT, e.g. 127.0.0.1:50051, plaintext unless
    /// --endpoint-ca is given; or http://… / https://…) over one CaptionStream call, instead of
    /// loading the models here.
    #[arg(long, env = "CAPTION_ENDPOINT")]
    pub endpoint: Option<String>,
    /// PEM CA certificate the --endpoint server's TLS certificate must chain to.
    #[arg(long, env = "CAPTION_ENDPOINT_CA", requires = "endpoint")]
    pub endpoint_ca: Option<PathBuf>,
    /// File holding the bearer token the --endpoint server asks for.
    #[arg(long, env = "CAPTION_ENDPOINT_TOKEN_FILE", requires = "endpoint")]
    pub endpoint_token_file: Option<PathBuf>,
    /// Candidate captions BLIP writes per image.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub num_candidates: u32,
    /// Ranked captions printed per image.
    #[arg(long, short = 'k', default_value_t = 3)]
    pub top_k: u32,
    /// Show each distinct caption once, with its copies' probabilities summed and how many
    /// candidates it was, instead of one entry per candidate as the origin job prints them (in
    /// text and with --json alike).
    #[arg(long)]
    pub merge: bool,
    /// Decode greedily instead of sampling.
    #[arg(long, conflicts_with = "beams")]
    pub greedy: bool,
    /// Beam search with this many beams instead of sampling (candidates: the best beams).
    #[arg(long)]
    pub beams: Option<u32>,
    /// Start every caption from this text (e.g. "a picture of").
    #[arg(long)]
    pub prompt: Option<String>,
    /// Remove the prompt from the printed captions.
    #[arg(long, requires = "prompt")]
    pub strip_prompt: bool,
    /// Use the origin notebook's decoding settings (sampling, top_p 0.9, repetition penalty 1.1, min_length 10, max_length 80).
    #[arg(long)]
    pub notebook: bool,
    /// Seed of the sampler, for reproducible candidates. Default: a random one for each image,
    /// as the API and the Beam pipeline do.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object per image (every candidate's entry, or with --merge each distinct
    /// caption's) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print nothing per image on stdout (the progress bar, the errors and the summary stay on
    /// stderr); with --output, the results are in the file.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub async fn run(args: CaptionArgs) -> anyhow::Result<()> {
    let names = images(&args)?;
    let mode = match (args.json, args.merge) {
        (true, _) => Mode::Json,
        (false, true) => Mode::Merged,
        (false, false) => Mode::Origin,
    };
    let shape = Shape {
        params: request_params(&args),
        top_k: args.top_k,
        // The origin lists every candidate; --merge shows each distinct caption once.
        each_candidate: !args.merge,
    };
    let recipe = report::Recipe::of(&shape);
    let mut output = args.output.as_deref().map(|path| report::Output::open(path, &recipe)).transpose()?;
    let (jobs, skipped) = pending(&names, output.as_ref());
    let target = target(&args).await?;
    let started = Instant::now();
    let total = jobs.len();
    let names_of: Vec<(usize, String)> = jobs.iter().map(|j| (j.seq, j.name.clone())).collect();
    let concurrency = args.concurrency.max(1);
    let (tx, rx) = mpsc::channel::<Done>(concurrency);
    let worker = tokio::spawn({
        let target = target.clone();
        async move { target.run(jobs, shape, concurrency, tx).await }
    });
    let mut shown = Shown {
        progress: Progress::new(total as u64),
        output: output.as_mut(),
        recipe: &recipe,
        quiet: args.quiet,
        ok: 0,
        failed: 0,
    };
    let render =
        |outcome: &runner::Outcome, name: &str| report::render(mode, name, outcome, args.top_k, args.num_candidates);
    let remaining = shown.in_list_order(rx, &names_of, render).await?;
    // Whatever the stream could not answer (the server went away) is recorded as failed, so a
    // rerun with the same output picks it up.
    let (code, reason) = match worker.await? {
        Err(status) => (status.code(), status.message().to_string()),
        Ok(()) => (tonic::Code::Unavailable, "no answer came".to_string()),
    };
    for (seq, name) in names_of.iter().filter(|(seq, _)| remaining.contains(seq)) {
        shown.failure(&Done::failed(*seq, name.clone(), code, reason.clone()))?;
    }
    let Shown { progress, ok, failed, .. } = shown;
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "caption: {ok} captioned, {failed} failed{} in {secs:.1} s ({:.2} images/s)",
        if skipped > 0 { format!(", {skipped} skipped") } else { String::new() },
        ok as f64 / secs.max(1e-9),
    );
    if let Target::Local(Captioning::Local(captioner)) = target {
        let scheduler = captioner.models().scheduler.clone();
        tokio::task::spawn_blocking(move || scheduler.shutdown()).await?;
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {total} images failed");
    }
    Ok(())
}

/// The images the command names: its arguments, then the lines of `--input`.
fn images(args: &CaptionArgs) -> anyhow::Result<Vec<String>> {
    let mut names = args.images.clone();
    if let Some(input) = &args.input {
        names.extend(read_list(input)?);
    }
    Ok(names)
}

/// The images still to caption, by their place in the list, and how many the output already
/// holds a result for.
fn pending(names: &[String], output: Option<&report::Output>) -> (Vec<Job>, usize) {
    let done: HashSet<&String> = output.map(|o| o.done.iter().collect()).unwrap_or_default();
    let jobs: Vec<Job> = names
        .iter()
        .enumerate()
        .filter(|(_, name)| !done.contains(name))
        .map(|(seq, name)| Job { seq, name: name.clone() })
        .collect();
    let skipped = names.len() - jobs.len();
    if skipped > 0 {
        eprintln!("caption: {skipped} of {} images already have a result in the output: skipped", names.len());
    }
    (jobs, skipped)
}

/// Who captions: the server `--endpoint` names, or the models loaded here.
async fn target(args: &CaptionArgs) -> anyhow::Result<Target> {
    if let Some(endpoint) = &args.endpoint {
        let remote = Remote::connect(endpoint, args.endpoint_ca.as_deref(), args.endpoint_token_file.as_deref());
        return Ok(Target::Remote(remote.await?));
    }
    let engine = args.engine.clone().for_bulk();
    let captioner = tokio::task::spawn_blocking(move || {
        crate::app::build_captioner_with(&engine, &Policy::bulk(), crate::app::ModelSet::BOTH, ResultCacheConfig::OFF)
    })
    .await??;
    Ok(Target::Local(Captioning::Local(captioner)))
}

/// Where results go as they come: the output file in completion order, stdout in list order,
/// errors to stderr, and the tallies.
struct Shown<'a> {
    progress: Progress,
    output: Option<&'a mut report::Output>,
    /// What every record says it was made with.
    recipe: &'a report::Recipe,
    quiet: bool,
    ok: usize,
    failed: usize,
}

impl Shown<'_> {
    /// Shows every result `rx` brings, each image's text once all before it in the list are
    /// shown; returns the images no result came for.
    async fn in_list_order(
        &mut self,
        mut rx: mpsc::Receiver<Done>,
        names_of: &[(usize, String)],
        render: impl Fn(&runner::Outcome, &str) -> String,
    ) -> anyhow::Result<HashSet<usize>> {
        let mut remaining: HashSet<usize> = names_of.iter().map(|(seq, _)| *seq).collect();
        let order: Vec<usize> = names_of.iter().map(|(seq, _)| *seq).collect();
        let mut printed = 0;
        let mut waiting: BTreeMap<usize, Option<String>> = BTreeMap::new();
        while let Some(done) = rx.recv().await {
            remaining.remove(&done.seq);
            let text = match &done.result {
                Ok(outcome) => {
                    self.record(&done)?;
                    self.ok += 1;
                    Some(render(outcome, &done.name))
                }
                Err(_) => {
                    self.failure(&done)?;
                    None
                }
            };
            waiting.insert(done.seq, text);
            while let Some(text) = order.get(printed).and_then(|seq| waiting.remove(seq)) {
                if let Some(text) = text.filter(|_| !self.quiet) {
                    self.progress.println(&text);
                }
                printed += 1;
            }
            self.progress.tick(self.failed);
        }
        // Answers that waited for one that never came are shown now, still in list order.
        for text in waiting.into_values().flatten().filter(|_| !self.quiet) {
            self.progress.println(&text);
        }
        Ok(remaining)
    }

    fn record(&mut self, done: &Done) -> anyhow::Result<()> {
        if let Some(out) = self.output.as_mut() {
            out.append(&Record::of(done, self.recipe))?;
        }
        Ok(())
    }

    /// A failed image: recorded, said on stderr, counted.
    fn failure(&mut self, done: &Done) -> anyhow::Result<()> {
        self.record(done)?;
        if let Err(failure) = &done.result {
            self.progress.eprintln(&format!("Image: {}: error: {}", done.name, failure.message));
        }
        self.failed += 1;
        Ok(())
    }
}

/// The images a list file names, one per line.
fn read_list(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let read = |r: &mut dyn BufRead| -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for line in r.lines() {
            let line = line?;
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                names.push(line.to_string());
            }
        }
        Ok(names)
    };
    let names = if path.as_os_str() == "-" {
        read(&mut std::io::stdin().lock())
    } else {
        std::fs::File::open(path).and_then(|f| read(&mut std::io::BufReader::new(f)))
    };
    names.map_err(|e| anyhow::anyhow!("--input {}: {e}", path.display()))
}

/// The request's generation parameters as the command line sets them.
fn request_params(args: &CaptionArgs) -> pb::GenerationParams {
    pb::GenerationParams {
        num_candidates: Some(args.num_candidates),
        decoding: validate::decoding(strategy(args)) as i32,
        num_beams: args.beams,
        seed: args.seed,
        prompt: args.prompt.clone(),
        strip_prompt: Some(args.strip_prompt),
        preset: if args.notebook { pb::Preset::Notebook } else { pb::Preset::Unspecified } as i32,
        ..Default::default()
    }
}

fn strategy(args: &CaptionArgs) -> Strategy {
    match (args.greedy, args.beams) {
        (true, _) => Strategy::Greedy,
        (false, Some(_)) => Strategy::Beam,
        (false, None) => Strategy::Sample,
    }
}
