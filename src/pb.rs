//! The wire contract every side speaks: the generated protobuf and gRPC code of `caption.v1` (and
//! the `google.rpc.Status` it uses), its codec, the descriptor set reflection serves, and the
//! metadata that carries a call's correlation key between tiers, and the canonical names of status
//! codes (in metric labels, logs and the CLI's records).

#![allow(clippy::all, missing_docs)]

mod codec;
pub mod status;

pub use codec::Codec;
use tonic::Code;

/// Modules mirror the proto packages, so generated cross-package paths resolve.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod caption {
    pub mod v1 {
        tonic::include_proto!("caption.v1");
    }
}

pub use caption::v1::*;

/// Encoded `FileDescriptorSet` of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("caption_descriptor");

/// Metadata that carries the correlation key from the cascade tier to its upstreams, which log it
/// with the call.
pub const KEY_HEADER: &str = "x-caption-key";

/// gRPC's canonical name of a status code, as every gRPC library spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::{code_name, Code};

    #[test]
    fn every_code_has_its_canonical_name() {
        for n in 0..=16 {
            let code = Code::from(n);
            // The canonical name is the Rust variant's in SCREAMING_SNAKE_CASE ("Ok" is "OK").
            let mut expected = String::new();
            for (i, c) in format!("{code:?}").chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    expected.push('_');
                }
                expected.push(c.to_ascii_uppercase());
            }
            assert_eq!(code_name(code), expected, "{code:?}");
        }
    }
}
