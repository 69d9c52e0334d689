//! Fetching image bytes by URL: http(s) with a size cap and a timeout, and `file://` only below
//! a directory the operator allowed.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use url::Url;

use super::ImageError;

#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// Largest accepted encoded image, in bytes (applies to inline bytes too).
    pub max_bytes: u64,
    /// Whole-request timeout of an http(s) fetch.
    pub timeout: Duration,
    /// Directory below which `file://` URLs may be read; `None` disables them.
    pub allow_file_dir: Option<PathBuf>,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self { max_bytes: 20 * 1024 * 1024, timeout: Duration::from_secs(10), allow_file_dir: None }
    }
}

#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    limits: FetchLimits,
    allowed_dir: Option<PathBuf>,
}

impl Fetcher {
    pub fn new(limits: FetchLimits) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(limits.timeout)
            .connect_timeout(limits.timeout)
            .user_agent(concat!("caption-cascade/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        let allowed_dir = match &limits.allow_file_dir {
            Some(dir) => Some(dir.canonicalize().map_err(|e| format!("--allow-file-dir {}: {e}", dir.display()))?),
            None => None,
        };
        Ok(Self { client, limits, allowed_dir })
    }

    /// Rejects inline bytes above the size limit.
    pub fn check_inline(&self, data: &[u8]) -> Result<(), ImageError> {
        if data.len() as u64 > self.limits.max_bytes {
            return Err(ImageError::TooLarge { limit: self.limits.max_bytes });
        }
        Ok(())
    }

    /// Parses `raw` and checks it names something this server may fetch: http(s), or file://
    /// when `--allow-file-dir` is set. Called before any cache lookup, so a string that is not
    /// such a URL (say `sha256:…`) can never find a cached image.
    pub fn check_url(&self, raw: &str) -> Result<Url, ImageError> {
        if raw.len() > MAX_URL_BYTES {
            return Err(ImageError::InvalidUrl {
                url: shown(raw),
                reason: format!("{} bytes, over the limit of {MAX_URL_BYTES}", raw.len()),
            });
        }
        let url = Url::parse(raw).map_err(|e| ImageError::InvalidUrl { url: shown(raw), reason: e.to_string() })?;
        match url.scheme() {
            "http" | "https" => Ok(url),
            "file" if self.allowed_dir.is_some() => Ok(url),
            "file" => Err(ImageError::FileNotAllowed(shown(raw))),
            other => Err(ImageError::InvalidUrl {
                url: shown(raw),
                reason: format!("scheme {other:?} is not supported (use http, https or file)"),
            }),
        }
    }

    pub async fn fetch(&self, raw: &str) -> Result<Vec<u8>, ImageError> {
        let url = self.check_url(raw)?;
        match url.scheme() {
            "file" => self.read_file(raw, &url).await,
            _ => self.fetch_http(url).await,
        }
    }

    async fn fetch_http(&self, url: Url) -> Result<Vec<u8>, ImageError> {
        let display = shown(url.as_str());
        let fail = |reason: String| ImageError::Fetch { url: display.clone(), reason };
        // Without the URL: the error already names it once.
        let mut resp = self.client.get(url.clone()).send().await.map_err(|e| fail(describe(&e.without_url())))?;
        if !resp.status().is_success() {
            return Err(fail(format!("server answered {}", resp.status())));
        }
        let limit = self.limits.max_bytes;
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(ImageError::TooLarge { limit });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(describe(&e.without_url())))? {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(ImageError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn read_file(&self, raw: &str, url: &Url) -> Result<Vec<u8>, ImageError> {
        let Some(dir) = &self.allowed_dir else {
            return Err(ImageError::FileNotAllowed(shown(raw)));
        };
        let path = url
            .to_file_path()
            .map_err(|_| ImageError::InvalidUrl { url: shown(raw), reason: "not a local file path".into() })?;
        // One answer for missing, outside the directory, not a regular file and unreadable, and
        // no server path in it: the error must not tell a caller what exists on the disk.
        let unavailable = || ImageError::Fetch {
            url: shown(raw),
            reason: "no readable file there under the allowed directory".into(),
        };
        // Canonicalising resolves `..` and symlinks, so the containment check cannot be escaped.
        let real = tokio::fs::canonicalize(&path).await.map_err(|_| unavailable())?;
        if !real.starts_with(dir) {
            return Err(unavailable());
        }
        let meta = tokio::fs::metadata(&real).await.map_err(|_| unavailable())?;
        // A FIFO or device would block a reading thread forever; a directory cannot be read.
        if !meta.is_file() {
            return Err(unavailable());
        }
        if meta.len() > self.limits.max_bytes {
            return Err(ImageError::TooLarge { limit: self.limits.max_bytes });
        }
        tokio::fs::read(&real).await.map_err(|_| unavailable())
    }
}

/// Longest URL accepted (RFC 9110 recommends supporting at least 8000 octets).
pub const MAX_URL_BYTES: usize = 8192;

/// A URL as error messages show it: cut to 200 bytes, so an error about a huge URL stays small.
fn shown(raw: &str) -> String {
    const SHOWN: usize = 200;
    if raw.len() <= SHOWN {
        return raw.to_string();
    }
    let mut end = SHOWN;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &raw[..end], raw.len())
}

/// reqwest's Display hides the cause ("error sending request"); the chain says what went wrong.
fn describe(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() { "timed out".to_string() } else { e.to_string() };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// `file://` URL of a local path, for the CLI's convenience.
pub fn file_url(path: &Path) -> Option<String> {
    let abs = path.canonicalize().ok()?;
    Url::from_file_path(abs).ok().map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher(dir: Option<PathBuf>) -> Fetcher {
        Fetcher::new(FetchLimits { max_bytes: 16, allow_file_dir: dir, ..Default::default() }).unwrap()
    }

    #[tokio::test]
    async fn file_urls_need_an_allowed_directory_and_stay_inside_it() {
        let dir = std::env::temp_dir().join(format!("cc-fetch-{}", std::process::id()));
        let inner = dir.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::write(inner.join("a.bin"), b"hello").unwrap();
        std::fs::write(dir.join("secret.bin"), b"no").unwrap();
        std::fs::write(inner.join("big.bin"), [0u8; 64]).unwrap();
        let url = |p: &Path| Url::from_file_path(p).unwrap().to_string();

        let off = fetcher(None);
        assert!(matches!(off.fetch(&url(&inner.join("a.bin"))).await, Err(ImageError::FileNotAllowed(_))));

        let on = fetcher(Some(inner.clone()));
        assert_eq!(on.fetch(&url(&inner.join("a.bin"))).await.unwrap(), b"hello");
        let escape = format!("{}/../secret.bin", url(&inner));
        assert!(matches!(on.fetch(&escape).await, Err(ImageError::Fetch { .. })));
        assert!(matches!(on.fetch(&url(&inner.join("big.bin"))).await, Err(ImageError::TooLarge { limit: 16 })));
        assert!(matches!(on.fetch(&url(&inner.join("missing.bin"))).await, Err(ImageError::Fetch { .. })));
        // Missing, outside, a directory and a FIFO (which would block a reader forever) all get
        // the same answer, which names no server path.
        let fifo = inner.join("pipe");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let mut answers = Vec::new();
        for u in [url(&inner.join("missing.bin")), escape.clone(), url(&inner), url(&fifo)] {
            let err = tokio::time::timeout(Duration::from_secs(5), on.fetch(&u)).await.expect("no blocking read");
            let text = err.unwrap_err().to_string();
            answers.push(text.split_once(": ").map(|(_, reason)| reason.to_string()).unwrap_or(text));
        }
        assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
        assert!(!answers[0].contains(dir.to_str().unwrap()), "{}", answers[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn bad_urls_are_rejected_with_the_reason() {
        let f = fetcher(None);
        assert!(matches!(f.fetch("not a url").await, Err(ImageError::InvalidUrl { .. })));
        let err = f.fetch("ftp://example.com/a.png").await.unwrap_err();
        assert!(err.to_string().contains("\"ftp\" is not supported"), "{err}");
        assert!(f.check_inline(&[0u8; 17]).is_err());
        let huge = format!("http://example.com/{}", "a".repeat(100_000));
        let err = f.check_url(&huge).unwrap_err().to_string();
        assert!(err.len() < 400 && err.contains("over the limit of 8192"), "{err}");
        let hash = format!("sha256:{}", "ab".repeat(32));
        assert!(matches!(f.check_url(&hash), Err(ImageError::InvalidUrl { .. })), "a digest is not a URL");
    }
}
