//! Generated protobuf and gRPC code for `caption.v1`, and the descriptor set reflection serves.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("caption.v1");

/// Encoded `FileDescriptorSet` of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("caption_descriptor");
