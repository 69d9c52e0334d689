//! How an image a request names becomes its correlation key and its bytes, in one place for every
//! path (in-process, the split tier, the result cache, a stream item's failure): a URL is checked
//! once, inline bytes are size-checked and hashed once, a URL is fetched (in full, or on the
//! condition that it changed from a version the origin described) with the fetch metric counted,
//! and the validators the origin gave are handed back for the result cache to keep.

use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::CascadeError;
use crate::{
    engine::EngineError,
    images::{CacheKey, CheckedUrl, Conditional, Fetcher, ImageError, Validators},
    validate::InvalidParam,
};

/// SHA-256 of an image's encoded bytes.
pub type Digest = [u8; 32];

/// Where an image comes from, as a request gives it. Inline bytes are shared, not copied, on
/// their way to the decoder.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Url(String),
    Bytes(Arc<Vec<u8>>),
}

/// An image a request names, checked, with its correlation key: the URL as given, or
/// `sha256:<hex>` of the inline bytes. Logs show the key's [`label`].
#[derive(Debug, Clone)]
pub struct NamedImage {
    pub key: String,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub enum Origin {
    Url(CheckedUrl),
    Inline { bytes: Arc<Vec<u8>>, digest: Digest },
}

impl NamedImage {
    /// What the image cache knows this image's pixels by.
    pub fn cache_key(&self) -> CacheKey {
        match &self.origin {
            Origin::Url(url) => CacheKey::Url(url.as_str().to_string()),
            Origin::Inline { digest, .. } => CacheKey::Inline(*digest),
        }
    }
}

/// What a fetch learned of an image.
#[derive(Debug)]
pub enum Fetch {
    /// Its bytes as they are now, with the validators of that version if the origin gave any.
    Bytes { bytes: Arc<Vec<u8>>, validators: Option<Validators> },
    /// The version the given validators describe is still current; `final_url` is where the
    /// redirects, if any, led.
    NotModified { final_url: String },
}

/// Names and fetches images under the server's fetch limits and egress policy.
pub struct Resolver {
    fetcher: Fetcher,
}

impl Resolver {
    pub fn new(fetcher: Fetcher) -> Self {
        Self { fetcher }
    }

    /// The checked image and its key. Hashing happens here, once per request.
    pub async fn name(&self, source: ImageSource) -> Result<NamedImage, CascadeError> {
        match source {
            ImageSource::Url(url) if url.is_empty() => Err(InvalidParam::new("image.url", "is empty").into()),
            ImageSource::Url(url) => {
                let checked = self.fetcher.check_url(&url)?;
                Ok(NamedImage { key: url, origin: Origin::Url(checked) })
            }
            ImageSource::Bytes(bytes) => {
                self.fetcher.check_inline(&bytes)?;
                let digest = digest(&bytes).await?;
                Ok(NamedImage { key: inline_key(&digest), origin: Origin::Inline { bytes, digest } })
            }
        }
    }

    /// The image's bytes as they are now: inline ones as given, a URL's fetched in full.
    pub async fn bytes(&self, image: &NamedImage) -> Result<Arc<Vec<u8>>, ImageError> {
        Ok(self.fetch(image).await?.0)
    }

    /// As [`Resolver::bytes`], with the validators the origin gave for this version, if any.
    pub async fn fetch(&self, image: &NamedImage) -> Result<(Arc<Vec<u8>>, Option<Validators>), ImageError> {
        match &image.origin {
            Origin::Inline { bytes, .. } => Ok((bytes.clone(), None)),
            Origin::Url(url) => {
                let fetched = self.fetcher.fetch(url).await;
                counted(fetched.as_ref().map(|_| "ok"));
                let fetched = fetched?;
                Ok((Arc::new(fetched.bytes), fetched.validators))
            }
        }
    }

    /// The image's bytes only if they changed from the version `known` describes; inline bytes
    /// are as given.
    pub async fn fetch_if_changed(&self, image: &NamedImage, known: &Validators) -> Result<Fetch, ImageError> {
        let url = match &image.origin {
            Origin::Inline { bytes, .. } => return Ok(Fetch::Bytes { bytes: bytes.clone(), validators: None }),
            Origin::Url(url) => url,
        };
        let answer = self.fetcher.fetch_if_changed(url, known).await;
        counted(answer.as_ref().map(|a| match a {
            Conditional::Changed(_) => "ok",
            Conditional::NotModified { .. } => "not_modified",
        }));
        Ok(match answer? {
            Conditional::Changed(fetched) => {
                Fetch::Bytes { bytes: Arc::new(fetched.bytes), validators: fetched.validators }
            }
            Conditional::NotModified { final_url } => Fetch::NotModified { final_url },
        })
    }
}

/// Counts a fetch by its outcome.
fn counted(outcome: Result<&'static str, &ImageError>) {
    let outcome = outcome.unwrap_or("error");
    metrics::counter!("caption_images_fetched_total", "outcome" => outcome).increment(1);
}

/// SHA-256 of image bytes; hashing 20 MB takes tens of milliseconds, so not on an async worker.
pub async fn digest(data: &Arc<Vec<u8>>) -> Result<Digest, EngineError> {
    let bytes = data.clone();
    tokio::task::spawn_blocking(move || Sha256::digest(bytes.as_slice()).into())
        .await
        .map_err(|e| EngineError::Internal(format!("hashing task failed: {e}")))
}

/// How a key appears in the server's logs and in the key a cascade tier sends its upstreams: a
/// URL as scheme, host, port and path only, since its userinfo, query and fragment may be
/// credentials (a pre-signed URL is one); the key of inline bytes as it is. Only a named image
/// has a key, so a URL key has passed the URL check and parses.
pub fn label(key: &str) -> String {
    if key.starts_with(INLINE_PREFIX) {
        return key.to_string();
    }
    match url::Url::parse(key) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.into()
        }
        Err(_) => "(not a url)".into(),
    }
}

const INLINE_PREFIX: &str = "sha256:";

/// The correlation key of inline bytes.
pub(super) fn inline_key(digest: &Digest) -> String {
    let mut key = String::with_capacity(7 + 64);
    key.push_str(INLINE_PREFIX);
    for b in digest {
        key.push_str(&format!("{b:02x}"));
    }
    key
}
