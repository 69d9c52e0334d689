//! The optional bearer tokens that every call except health checks must carry: one fixed token
//! (--auth-token), or the tokens of a file read again whenever its content changes
//! (--auth-token-file), so a rotation needs no restart. Tokens are compared as SHA-256 digests in
//! constant time, against every valid one, so neither a token's content nor which one matched
//! leaks by timing.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::Request;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tonic::Status;

use crate::watched::{tokens, Contents, FileWatch};

/// Health checks stay open: Kubernetes probes and load balancers carry no token.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

type Digests = Arc<[[u8; 32]]>;

/// The tokens a server accepts; cheap to clone (one per connection).
#[derive(Clone)]
pub struct BearerAuth(Arc<Source>);

enum Source {
    Fixed(Digests),
    File { path: PathBuf, state: Mutex<Watched> },
}

struct Watched {
    watch: FileWatch,
    /// Empty while the file is missing, empty or malformed: every call is refused then, rather
    /// than the tokens it held before, which a rotation may have meant to revoke.
    valid: Digests,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(…)")
    }
}

impl BearerAuth {
    /// One fixed token from its secret text; surrounding whitespace is not part of it.
    pub fn fixed(secret: &str) -> Result<Self, String> {
        let token = tokens::one(secret).map_err(|e| format!("the auth token: {e}"))?;
        Ok(Self(Arc::new(Source::Fixed(Arc::new([digest(token)])))))
    }

    /// The tokens of `path`, looked at again at most once per `recheck`. A file without a valid
    /// token is an error here, so a misconfigured server does not start.
    pub fn from_file(path: &Path, recheck: Duration) -> Result<Self, String> {
        let (watch, contents) = FileWatch::new(vec![path.to_path_buf()], recheck);
        let valid = file_tokens(contents).map_err(|e| format!("--auth-token-file {}: {e}", path.display()))?;
        Ok(Self(Arc::new(Source::File { path: path.to_path_buf(), state: Mutex::new(Watched { watch, valid }) })))
    }

    /// Whether `req` may go on; the refusal says what is expected, never what was sent.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), Status> {
        if req.uri().path().starts_with(OPEN_PREFIX) {
            return Ok(());
        }
        let presented =
            req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer).ok_or_else(
                || Status::unauthenticated("this server needs a bearer token (authorization: Bearer <token>)"),
            )?;
        let presented = digest(presented);
        // Every valid token is compared, without an early exit.
        let matched = self.valid().iter().fold(Choice::from(0), |any, valid| any | presented.ct_eq(valid));
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Status::unauthenticated("the bearer token is not valid"))
        }
    }

    /// The digests of the tokens valid now, after reading the file again if it is time to.
    fn valid(&self) -> Digests {
        match &*self.0 {
            Source::Fixed(valid) => valid.clone(),
            Source::File { path, state } => {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(contents) = state.watch.changed() {
                    match file_tokens(contents) {
                        Ok(valid) => {
                            tracing::info!(file = %path.display(), tokens = valid.len(), "auth token file changed: reloaded");
                            state.valid = valid;
                        }
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "auth token file changed and holds no valid token: refusing every call but health checks until it does");
                            state.valid = Arc::new([]);
                        }
                    }
                }
                state.valid.clone()
            }
        }
    }
}

fn file_tokens(mut contents: Contents) -> Result<Digests, String> {
    let bytes = contents.pop().expect("one file is watched").map_err(|e| e.to_string())?;
    Ok(tokens::parse(&bytes)?.into_iter().map(digest).collect())
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The credentials of an `authorization: Bearer <token>` header value. The scheme's name is
/// case-insensitive (RFC 7235) and one or more spaces follow it.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case("bearer") || !rest.starts_with(' ') {
        return None;
    }
    let token = rest.trim_start_matches(' ').trim_end();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &BearerAuth, path: &str, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::builder().uri(path);
        if let Some(a) = header {
            req = req.header("authorization", a);
        }
        auth.check(&req.body(()).unwrap()).map_err(|s| s.code())
    }

    const CAPTION: &str = "/caption.v1.Cascade/Caption";
    const UNAUTH: Result<(), tonic::Code> = Err(tonic::Code::Unauthenticated);

    #[test]
    fn every_path_but_health_needs_the_token() {
        let auth = BearerAuth::fixed("s3cret\n").unwrap();
        assert_eq!(call(&auth, CAPTION, None), UNAUTH);
        assert_eq!(call(&auth, CAPTION, Some("Bearer wrong")), UNAUTH);
        assert_eq!(call(&auth, CAPTION, Some("Basic s3cret")), UNAUTH);
        assert_eq!(call(&auth, CAPTION, Some("Bearer s3cret")), Ok(()));
        assert_eq!(call(&auth, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None), UNAUTH);
        assert_eq!(call(&auth, "/grpc.health.v1.Health/Check", None), Ok(()));
        assert!(BearerAuth::fixed(" \n").is_err());
        assert!(BearerAuth::fixed("two words").is_err());
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_one_or_more_spaces_follow_it() {
        let auth = BearerAuth::fixed("s3cret").unwrap();
        for ok in ["bearer s3cret", "BEARER s3cret", "BeArEr s3cret", "Bearer   s3cret", "Bearer s3cret "] {
            assert_eq!(call(&auth, CAPTION, Some(ok)), Ok(()), "{ok:?}");
        }
        for refused in ["Bearers3cret", "Bearer", "Bearer ", "Bearer\ts3cret", "Bear s3cret", "xbearer s3cret"] {
            assert_eq!(call(&auth, CAPTION, Some(refused)), UNAUTH, "{refused:?}");
        }
        // The token itself stays case-sensitive.
        assert_eq!(call(&auth, CAPTION, Some("bearer S3CRET")), UNAUTH);
    }

    #[test]
    fn a_token_file_is_read_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("cc-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "").unwrap();
        assert!(BearerAuth::from_file(&path, Duration::ZERO).is_err(), "an empty file at start");
        assert!(BearerAuth::from_file(&dir.join("missing"), Duration::ZERO).is_err(), "a missing file at start");
        std::fs::write(&path, "old\n").unwrap();
        let auth = BearerAuth::from_file(&path, Duration::ZERO).unwrap();
        let with = |token: &str| call(&auth, CAPTION, Some(&format!("Bearer {token}")));
        assert_eq!(with("old"), Ok(()));
        std::fs::write(&path, " old \n\nnew\n").unwrap();
        assert_eq!((with("old"), with("new")), (Ok(()), Ok(())), "both tokens of a rotation");
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!((with("old"), with("new")), (UNAUTH, Ok(())));
        for bad in ["", "new\ntwo words\n"] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!((with("old"), with("new")), (UNAUTH, UNAUTH), "{bad:?} refuses every call");
            assert_eq!(call(&auth, "/grpc.health.v1.Health/Check", None), Ok(()));
            std::fs::write(&path, "new\n").unwrap();
            assert_eq!(with("new"), Ok(()));
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(with("new"), UNAUTH, "a deleted file refuses every call");
        std::fs::write(&path, "newer").unwrap();
        assert_eq!(with("newer"), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
