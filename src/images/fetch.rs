//! Fetching image bytes by URL: http(s) with a size cap, a timeout and the egress policy, and
//! `file://` only for regular files below a directory the operator allowed, with the same bounds.
//! A conditional variant asks the origin whether an image changed since a version it described
//! (ETag, Last-Modified), through the same client, policy and limits.

use std::{
    error::Error as StdError,
    io::ErrorKind,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use reqwest::{header, StatusCode};
use url::Url;

use super::{
    conditional::{Conditional, Fetched, Validators},
    egress::{self, Denied, EgressPolicy, RedirectRefused, Unresolved},
    ImageError,
};

#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// Largest accepted encoded image, in bytes (applies to inline bytes too).
    pub max_bytes: u64,
    /// Whole-request timeout of an http(s) fetch, and of a file read.
    pub timeout: Duration,
    /// Directory below which `file://` URLs may be read; `None` disables them.
    pub allow_file_dir: Option<PathBuf>,
    /// Addresses http(s) fetches may connect to.
    pub egress: EgressPolicy,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            timeout: Duration::from_secs(10),
            allow_file_dir: None,
            egress: EgressPolicy::default(),
        }
    }
}

/// A URL [`Fetcher::check_url`] accepted: only such a URL is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedUrl {
    /// As the caller spelled it: the correlation key, and the image cache's key.
    raw: String,
    url: Url,
}

impl CheckedUrl {
    pub fn as_str(&self) -> &str {
        &self.raw
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
        let mut builder = reqwest::Client::builder()
            .timeout(limits.timeout)
            .connect_timeout(limits.timeout)
            .user_agent(concat!("caption-cascade/", env!("CARGO_PKG_VERSION")))
            .redirect(egress::redirect_policy(limits.egress.clone()));
        if !limits.egress.is_unrestricted() {
            // Through a proxy the address connected to would be the proxy's, and the proxy would
            // reach the destination unchecked: proxy variables from the environment must not apply.
            builder = builder.no_proxy().dns_resolver(Arc::new(egress::PolicyResolver::new(limits.egress.clone())));
        }
        let client = builder.build().map_err(|e| e.to_string())?;
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
    /// when `--allow-file-dir` is set. Every fetch takes the [`CheckedUrl`] this returns, so a URL
    /// is checked once per request, before any cache lookup: a string that is not such a URL (say
    /// `sha256:…`) can never find a cached image.
    pub fn check_url(&self, raw: &str) -> Result<CheckedUrl, ImageError> {
        if raw.len() > MAX_URL_BYTES {
            return Err(ImageError::InvalidUrl {
                url: shown(raw),
                reason: format!("{} bytes, over the limit of {MAX_URL_BYTES}", raw.len()),
            });
        }
        let url = Url::parse(raw).map_err(|e| ImageError::InvalidUrl { url: shown(raw), reason: e.to_string() })?;
        if !url.username().is_empty() || url.password().is_some() {
            // reqwest would send them as Basic auth to whatever the URL names. The message shows
            // the URL without them: it may end up in the caller's logs.
            let mut bare = url.clone();
            let _ = bare.set_username("");
            let _ = bare.set_password(None);
            return Err(ImageError::InvalidUrl {
                url: shown(bare.as_str()),
                reason: "credentials in image URLs are not accepted".into(),
            });
        }
        match url.scheme() {
            "http" | "https" => Ok(CheckedUrl { raw: raw.to_string(), url }),
            "file" if self.allowed_dir.is_some() => Ok(CheckedUrl { raw: raw.to_string(), url }),
            "file" => Err(ImageError::FileNotAllowed(shown(raw))),
            other => Err(ImageError::InvalidUrl {
                url: shown(raw),
                reason: format!("scheme {other:?} is not supported (use http, https or file)"),
            }),
        }
    }

    /// The image at `url` with the validators of its version, when the origin gave usable ones.
    pub async fn fetch(&self, url: &CheckedUrl) -> Result<Fetched, ImageError> {
        match self.get(url, None).await? {
            Conditional::Changed(fetched) => Ok(fetched),
            // Only a request with validators is answered so (a 304 to another is a failure).
            Conditional::NotModified { .. } => Err(ImageError::Fetch {
                url: shown(&url.raw),
                reason: format!("server answered {}", StatusCode::NOT_MODIFIED),
            }),
        }
    }

    /// Asks the origin for the image at `url` only if it changed from the version `known`
    /// describes (`If-None-Match`, `If-Modified-Since`), through the same client, egress policy,
    /// redirect rule, size and time limits as [`Fetcher::fetch`]. A `file://` URL is read in full:
    /// files have no validators.
    pub async fn fetch_if_changed(&self, url: &CheckedUrl, known: &Validators) -> Result<Conditional, ImageError> {
        self.get(url, Some(known)).await
    }

    async fn get(&self, checked: &CheckedUrl, known: Option<&Validators>) -> Result<Conditional, ImageError> {
        match checked.url.scheme() {
            "file" => {
                let bytes = self.read_file(&checked.raw, &checked.url).await?;
                Ok(Conditional::Changed(Fetched { bytes, validators: None }))
            }
            _ => self.fetch_http(checked.url.clone(), known).await,
        }
    }

    /// Checks and fetches `raw` in one go, for the tests of fetching itself.
    #[cfg(test)]
    async fn fetch_str(&self, raw: &str) -> Result<Vec<u8>, ImageError> {
        Ok(self.fetch(&self.check_url(raw)?).await?.bytes)
    }

    async fn fetch_http(&self, url: Url, known: Option<&Validators>) -> Result<Conditional, ImageError> {
        let display = shown(url.as_str());
        let fail = |reason: String| ImageError::Fetch { url: display.clone(), reason };
        if self.limits.egress.check_url_host(&url).is_err() {
            return Err(denied(display.clone()));
        }
        let transport = |e: reqwest::Error| match failure(&e) {
            Failure::Denied => denied(display.clone()),
            Failure::Other(reason) => fail(reason),
        };
        let mut request = self.client.get(url);
        if let Some(known) = known {
            if let Some(etag) = &known.etag {
                request = request.header(header::IF_NONE_MATCH, etag.as_str());
            }
            if let Some(modified) = &known.last_modified {
                request = request.header(header::IF_MODIFIED_SINCE, modified.as_str());
            }
        }
        let mut resp = request.send().await.map_err(transport)?;
        if resp.status() == StatusCode::NOT_MODIFIED && known.is_some() {
            // Where the redirects (if any) led: the validators were about that resource.
            return Ok(Conditional::NotModified { final_url: resp.url().to_string() });
        }
        if !resp.status().is_success() {
            return Err(fail(format!("server answered {}", resp.status())));
        }
        let validators = Validators::of(resp.headers(), resp.url());
        let limit = self.limits.max_bytes;
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(ImageError::TooLarge { limit });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(ImageError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Conditional::Changed(Fetched { bytes: body, validators }))
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
        let max = self.limits.max_bytes;
        let read = tokio::task::spawn_blocking(move || read_regular_file(&real, max));
        match tokio::time::timeout(self.limits.timeout, read).await {
            Ok(Ok(Ok(bytes))) => Ok(bytes),
            Ok(Ok(Err(FileRead::TooLarge))) => Err(ImageError::TooLarge { limit: max }),
            Ok(Ok(Err(FileRead::Unavailable))) | Ok(Err(_)) => Err(unavailable()),
            // A stalled disk or network filesystem: the caller is answered, the thread finishes
            // the read (or fails it) on its own.
            Err(_) => Err(ImageError::Fetch { url: shown(raw), reason: "timed out".into() }),
        }
    }
}

enum FileRead {
    Unavailable,
    TooLarge,
}

/// Reads `path` if it is a regular file of at most `max` bytes. Blocking.
fn read_regular_file(path: &Path, max: u64) -> Result<Vec<u8>, FileRead> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    // Non-blocking open: opening a FIFO would otherwise wait for a writer. The type and size are
    // then taken from the open handle, so a file swapped after a check by path cannot slip by.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|_| FileRead::Unavailable)?;
    let meta = file.metadata().map_err(|_| FileRead::Unavailable)?;
    // A FIFO or device could block or never end; a directory cannot be read.
    if !meta.is_file() {
        return Err(FileRead::Unavailable);
    }
    if meta.len() > max {
        return Err(FileRead::TooLarge);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // A file that grows while it is read is still cut at the limit.
    file.take(max + 1).read_to_end(&mut bytes).map_err(|_| FileRead::Unavailable)?;
    if bytes.len() as u64 > max {
        return Err(FileRead::TooLarge);
    }
    Ok(bytes)
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

/// A denied destination: counted, and answered without the address or the reason, so the
/// answer tells a caller nothing about what lives on the server's network.
fn denied(url: String) -> ImageError {
    metrics::counter!("caption_fetch_denied_total").increment(1);
    ImageError::DestinationDenied { url }
}

enum Failure {
    Denied,
    Other(String),
}

/// What went wrong with a fetch, in a few fixed words. The raw chain (OS errors, parser
/// messages, a TLS alert) would let a caller tell a closed port from a filtered one or a
/// non-HTTP service from an HTTP one, which is what a port scanner needs.
fn failure(e: &reqwest::Error) -> Failure {
    let chain = causes(e);
    let find = |check: &dyn Fn(&(dyn StdError + 'static)) -> bool| chain.iter().any(|c| check(*c));
    if find(&|c| c.is::<Denied>()) {
        return Failure::Denied;
    }
    if let Some(refused) = chain.iter().find_map(|c| c.downcast_ref::<RedirectRefused>()) {
        return Failure::Other(refused.to_string());
    }
    if e.is_timeout() {
        return Failure::Other("timed out".into());
    }
    if find(&|c| c.is::<rustls::Error>()) {
        return Failure::Other("TLS handshake failed".into());
    }
    if find(&|c| c.is::<Unresolved>()) {
        return Failure::Other("could not resolve the host name".into());
    }
    if let Some(h) = chain.iter().find_map(|c| c.downcast_ref::<hyper::Error>()) {
        if h.is_timeout() {
            return Failure::Other("timed out".into());
        }
        if h.is_parse() {
            return Failure::Other("not a valid HTTP response".into());
        }
        if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
            return Failure::Other("connection closed early".into());
        }
    }
    if e.is_connect() {
        return Failure::Other("could not connect".into());
    }
    let io_kind = chain.iter().find_map(|c| c.downcast_ref::<std::io::Error>()).map(std::io::Error::kind);
    if let Some(
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof,
    ) = io_kind
    {
        return Failure::Other("connection closed early".into());
    }
    if e.is_redirect() {
        return Failure::Other("the redirect could not be followed".into());
    }
    if e.is_body() || e.is_decode() {
        return Failure::Other("connection closed early".into());
    }
    Failure::Other("the request failed".into())
}

/// `e` and its causes. `io::Error` hides a wrapped error from `source()` (it returns the wrapped
/// error's own source), so its inner error is taken explicitly.
fn causes<'a>(e: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        out.push(err);
        if out.len() > 32 {
            break;
        }
        next = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => err.source(),
        };
    }
    out
}

/// `file://` URL of a local path, for the CLI's convenience.
pub fn file_url(path: &Path) -> Option<String> {
    let abs = path.canonicalize().ok()?;
    Url::from_file_path(abs).ok().map(String::from)
}

#[cfg(test)]
mod tests;
