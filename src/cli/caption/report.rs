//! How the bulk job shows its results: the origin job's printout (or merged captions, or JSON) on
//! stdout, and one JSON record per image in the output file, which is also what a rerun resumes
//! from.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::Path,
};

use super::runner::{is_url, Done, Outcome, Shape};
use crate::pb;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The origin's lines: every candidate, duplicates included, K of them.
    Origin,
    /// Each distinct caption once, with its summed probability and count.
    Merged,
    /// One JSON object per image.
    Json,
}

/// What stdout shows for one captioned image.
pub fn render(mode: Mode, name: &str, out: &Outcome, top_k: u32, num_candidates: u32) -> String {
    let mut text = String::new();
    match mode {
        Mode::Json => return Record::success(name, out).0.to_string(),
        Mode::Origin | Mode::Merged => {
            text.push_str(&format!("Image: {}\n", origin_name(name)));
            text.push_str(&format!("\tTop {top_k} captions ranked by CLIP:\n"));
            for (i, c) in out.captions.iter().enumerate() {
                text.push_str(&format!("\t\t{}: {}. (Caption probability: {:.2}", i + 1, c.text, c.probability));
                if mode == Mode::Merged {
                    text.push_str(&format!(", {} of {num_candidates} candidates", c.count));
                }
                text.push_str(")\n");
            }
            // The origin ends each block with print('\n'): two empty lines.
            text.push_str("\n\n");
        }
    }
    text
}

/// The origin's image name: the last path segment up to its first dot (`…/Paris-sunset.jpg` →
/// `Paris-sunset`), as `os.path.basename(url).rsplit('.')[0]` gives it.
pub fn origin_name(name: &str) -> &str {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.split('.').next().unwrap_or(base)
}

/// What a result was made with: the generation parameters as sent, how many captions are
/// listed and whether each candidate is. Every line of the output file carries it, so a rerun
/// with other parameters cannot take results it would not have made for its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe(Value);

impl Recipe {
    pub fn of(shape: &Shape) -> Self {
        let p = &shape.params;
        Self(json!({
            "num_candidates": p.num_candidates, "max_length": p.max_length, "min_length": p.min_length,
            "decoding": p.decoding, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
            "repetition_penalty": p.repetition_penalty, "seed": p.seed, "prompt": p.prompt,
            "strip_prompt": p.strip_prompt, "preset": p.preset, "num_beams": p.num_beams,
            "length_penalty": p.length_penalty, "listed": shape.top_k, "each_candidate": shape.each_candidate,
        }))
    }
}

/// One image's line in the output file.
pub struct Record(Value);

impl Record {
    pub fn of(done: &Done, recipe: &Recipe) -> Self {
        let mut record = match &done.result {
            Ok(out) => Self::success(&done.name, out),
            Err(f) => Self(json!({
                "image": done.name,
                "key": f.key.clone().or_else(|| url_key(&done.name)),
                "error": {"code": pb::code_name(f.code), "message": f.message},
            })),
        };
        record.0["params"] = recipe.0.clone();
        record
    }

    fn success(name: &str, out: &Outcome) -> Self {
        let captions: Vec<_> = out
            .captions
            .iter()
            .map(|c| json!({"text": c.text, "probability": c.probability, "cosine": c.cosine, "count": c.count}))
            .collect();
        Self(json!({
            "image": name,
            "key": out.key,
            "captions": captions,
            "candidates": out.candidates,
            "total_ms": out.total_ms,
        }))
    }
}

/// A URL is its own key even when it failed before reaching anything that says so.
fn url_key(name: &str) -> Option<String> {
    is_url(name).then(|| name.to_string())
}

/// The JSONL output file, appended to, and the images it already holds a result for.
pub struct Output {
    file: File,
    pub done: HashSet<String>,
}

impl Output {
    /// The file at `path`, to resume a run made with `recipe`; one whose results were made with
    /// other parameters is refused, saying how to go on.
    pub fn open(path: &Path, recipe: &Recipe) -> anyhow::Result<Self> {
        let fail = |e: std::io::Error| anyhow::anyhow!("--output {}: {e}", path.display());
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(fail)?;
        let mut done = HashSet::new();
        let mut other = 0;
        for line in BufReader::new(&file).lines() {
            // A line cut by an interrupted run does not parse and is simply not counted as done.
            let Ok(record) = serde_json::from_str::<Value>(&line.map_err(fail)?) else { continue };
            if let (Some(image), None) = (record["image"].as_str(), record.get("error")) {
                if record.get("params") == Some(&recipe.0) {
                    done.insert(image.to_string());
                } else {
                    other += 1;
                }
            }
        }
        if other > 0 {
            anyhow::bail!(
                "--output {}: {other} of its results were made with other parameters than these (or by an \
                 older version, which did not record them); run again with the same parameters to resume, \
                 or give another --output file (or remove this one) to caption every image with these",
                path.display()
            );
        }
        // Start on a fresh line if the previous run was cut mid-line.
        let len = file.seek(SeekFrom::End(0)).map_err(fail)?;
        if len > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::End(-1)).map_err(fail)?;
            file.read_exact(&mut last).map_err(fail)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(fail)?;
            }
        }
        Ok(Self { file, done })
    }

    /// Appends and flushes one record, so an interrupted run loses at most the line being written.
    pub fn append(&mut self, record: &Record) -> anyhow::Result<()> {
        let mut line = record.0.to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_origins_basename_rule() {
        assert_eq!(origin_name("https://example.com/photos/Paris-sunset.jpg"), "Paris-sunset");
        assert_eq!(origin_name("examples/images/scene_1.png"), "scene_1");
        assert_eq!(origin_name("a/b/archive.tar.gz"), "archive");
        assert_eq!(origin_name("noext"), "noext");
        assert_eq!(origin_name("http://host/dir/"), "");
    }
}
