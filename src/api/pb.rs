//! Generated protobuf and gRPC code for `caption.v1` (and the `google.rpc.Status` it uses), and
//! the descriptor set reflection serves.

#![allow(clippy::all, missing_docs)]

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
