//! The optional bearer token that every call except health checks must carry. Tokens are compared
//! as SHA-256 digests in constant time, so neither the content nor the length leaks by timing.

use std::path::Path;

use http::Request;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

/// Health checks stay open: Kubernetes probes and load balancers carry no token.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone)]
pub struct BearerToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(…)")
    }
}

impl BearerToken {
    /// A token from its secret text; surrounding whitespace (a file's final newline) is not part of it.
    pub fn new(secret: &str) -> Result<Self, String> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Err("the auth token is empty".into());
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the auth token must be printable ASCII without spaces (it travels in a header)".into());
        }
        Ok(Self { digest: Sha256::digest(secret.as_bytes()).into() })
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--auth-token-file {}: {e}", path.display()))?;
        Self::new(&text).map_err(|e| format!("--auth-token-file {}: {e}", path.display()))
    }

    /// Whether `req` may go on; the refusal says what is expected, never what was sent.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), Status> {
        if req.uri().path().starts_with(OPEN_PREFIX) {
            return Ok(());
        }
        let presented = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("this server needs a bearer token (authorization: Bearer <token>)")
            })?;
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        if bool::from(digest.ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err(Status::unauthenticated("the bearer token is not valid"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(path: &str, auth: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::builder().uri(path);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        BearerToken::new("s3cret\n").unwrap().check(&req.body(()).unwrap()).map_err(|s| s.code())
    }

    #[test]
    fn every_path_but_health_needs_the_token() {
        let unauth = Err(tonic::Code::Unauthenticated);
        assert_eq!(call("/caption.v1.Cascade/Caption", None), unauth);
        assert_eq!(call("/caption.v1.Cascade/Caption", Some("Bearer wrong")), unauth);
        assert_eq!(call("/caption.v1.Cascade/Caption", Some("Basic s3cret")), unauth);
        assert_eq!(call("/caption.v1.Cascade/Caption", Some("Bearer s3cret")), Ok(()));
        assert_eq!(call("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None), unauth);
        assert_eq!(call("/grpc.health.v1.Health/Check", None), Ok(()));
        assert!(BearerToken::new(" \n").is_err());
        assert!(BearerToken::new("two words").is_err());
    }
}
