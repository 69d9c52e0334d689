//! What an origin says of the version of an image it sent (ETag, Last-Modified), kept to ask it
//! later whether the image changed, and the answers of such a conditional fetch.

use std::time::Duration;

use reqwest::header;
use url::Url;

/// What an origin said of the version of an image it sent, to ask it later whether the image
/// changed. Only validators that change whenever the bytes do are kept: a strong ETag, and a
/// Last-Modified at least a second older than the response's Date (RFC 9110 §8.8.2.2: a file
/// changed twice within one second keeps its Last-Modified). A weak ETag (`W/"…"`) matches
/// content the origin merely deems equivalent, so it is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The URL the validators describe: where redirects, if any, led.
    pub final_url: String,
}

impl Validators {
    /// The usable validators of a 200 response, if it carried any.
    pub(super) fn of(headers: &header::HeaderMap, final_url: &Url) -> Option<Self> {
        let text = |name| headers.get(name).and_then(|v: &header::HeaderValue| v.to_str().ok()).map(str::trim);
        let etag = text(header::ETAG).filter(|t| t.starts_with('"') && t.len() >= 2 && t.ends_with('"'));
        let date = text(header::DATE).and_then(|d| httpdate::parse_http_date(d).ok());
        let last_modified = text(header::LAST_MODIFIED).filter(|lm| match (httpdate::parse_http_date(lm), date) {
            (Ok(modified), Some(date)) => date.duration_since(modified).is_ok_and(|age| age >= Duration::from_secs(1)),
            _ => false,
        });
        (etag.is_some() || last_modified.is_some()).then(|| Self {
            etag: etag.map(String::from),
            last_modified: last_modified.map(String::from),
            final_url: final_url.to_string(),
        })
    }

    /// Bytes these hold, for a cache that keeps them.
    pub fn bytes(&self) -> usize {
        let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        len(&self.etag) + len(&self.last_modified) + self.final_url.len() + std::mem::size_of::<Self>()
    }
}

/// Bytes the origin sent, with the validators of their version if it gave usable ones.
#[derive(Debug)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub validators: Option<Validators>,
}

/// The answer to a conditional fetch.
#[derive(Debug)]
pub enum Conditional {
    /// The image (changed, or fetched for the first time).
    Changed(Fetched),
    /// 304: the version the validators describe is still current. `final_url`: where the
    /// request ended up after redirects.
    NotModified { final_url: String },
}
