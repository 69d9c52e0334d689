//! The bearer token the cascade tier sends its upstreams (--upstream-token-file): the file's first
//! token, read again when the file changes, so a rotation needs no restart. A file that becomes
//! empty, unreadable or malformed keeps the last good token (with a warning): the upstreams refuse
//! it once they revoke it, and until then the tier keeps working.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use tonic::metadata::{Ascii, MetadataValue};

use crate::watched::{tokens, Contents, FileWatch};

pub struct UpstreamToken {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    watch: FileWatch,
    header: MetadataValue<Ascii>,
}

impl UpstreamToken {
    /// The token of `path`, looked at again at most once per `recheck`; a file without a valid
    /// token is an error here, so a misconfigured tier does not start.
    pub fn load(path: &Path, recheck: Duration) -> Result<Self, String> {
        let (watch, contents) = FileWatch::new(vec![path.to_path_buf()], recheck);
        let header = header(contents).map_err(|e| format!("--upstream-token-file {}: {e}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), state: Mutex::new(State { watch, header }) })
    }

    /// The `authorization` value to send now, after reading the file again if it is time to.
    pub fn header(&self) -> MetadataValue<Ascii> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(contents) = state.watch.changed() {
            match header(contents) {
                Ok(header) => {
                    tracing::info!(file = %self.path.display(), "upstream token file changed: reloaded");
                    state.header = header;
                }
                Err(e) => tracing::warn!(
                    file = %self.path.display(),
                    error = %e,
                    "upstream token file changed and holds no valid token: still sending the last good one"
                ),
            }
        }
        state.header.clone()
    }
}

fn header(mut contents: Contents) -> Result<MetadataValue<Ascii>, String> {
    let bytes = contents.pop().expect("one file is watched").map_err(|e| e.to_string())?;
    let first = tokens::parse(&bytes)?[0];
    format!("Bearer {first}").parse().map_err(|_| "the token is not a valid header value".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_token_is_sent_and_the_last_good_one_kept() {
        let dir = std::env::temp_dir().join(format!("cc-upstream-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        assert!(UpstreamToken::load(&path, Duration::ZERO).is_err(), "a missing file at start");
        std::fs::write(&path, "\n").unwrap();
        assert!(UpstreamToken::load(&path, Duration::ZERO).is_err(), "an empty file at start");
        std::fs::write(&path, "old\n").unwrap();
        let token = UpstreamToken::load(&path, Duration::ZERO).unwrap();
        assert_eq!(token.header(), "Bearer old");
        std::fs::write(&path, "\n new \nnewer\n").unwrap();
        assert_eq!(token.header(), "Bearer new", "the first token line");
        for bad in ["", "two words\n"] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(token.header(), "Bearer new", "{bad:?} keeps the last good token");
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(token.header(), "Bearer new", "a deleted file keeps the last good token");
        std::fs::write(&path, "newest").unwrap();
        assert_eq!(token.header(), "Bearer newest");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
