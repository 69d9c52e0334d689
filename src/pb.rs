//! The wire contract every side speaks: the generated protobuf and gRPC code of `caption.v1` (and
//! the `google.rpc.Status` it uses), its codec, the descriptor set reflection serves, and the
//! metadata that carries a call's correlation key between tiers.

#![allow(clippy::all, missing_docs)]

mod codec;

pub use codec::Codec;

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
