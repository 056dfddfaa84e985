//! rigger-inference: a gRPC service that gives task orchestrators local LLM
//! inference (task enhancement, task decomposition, streaming generation) over
//! interchangeable runtimes.
//!
//! Rust callers depend on this crate for the generated client and messages
//! ([`proto`]) instead of copying the `.proto` files.

pub mod app;
pub mod backend;
pub mod config;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod json_schema;
pub mod loadgen;
pub mod meaning;
mod random;
pub mod server;
pub mod task;

/// Generated gRPC contracts of package `rigger.inference.v1`.
pub mod proto {
    tonic::include_proto!("rigger.inference.v1");

    /// Encoded file-descriptor set of the contracts, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/rigger_inference_descriptor.bin"));
}
