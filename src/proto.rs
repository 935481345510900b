//! Generated protobuf types and gRPC services: Triton's `inference` package (wire-compatible field
//! numbers) and the file descriptor set used by reflection and the config text-format parser.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Triton's `inference` package: `GRPCInferenceService` and `ModelConfig`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// The encoded `FileDescriptorSet` of every proto the worker serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
