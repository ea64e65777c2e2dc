//! Osprey's domain types, shared by every other crate.
//!
//! # Layout
//! - [`error`]: the one error code set used by both protocols (HTTP status, gRPC code, label).
//! - [`tensor`]: Open Inference Protocol datatypes and raw, validated tensors.
//! - [`model`]: the on-disk model repository (`<repo>/<model>/model.toml` + one ONNX file per
//!   variant), its strict parsing, and held-out evaluation sets.
//! - [`pipeline`]: pipelines in the repository (`<repo>/<pipeline>/pipeline.toml`): a chain of
//!   stage models and the tensor mapping between them.
//! - [`multimodal`]: multi-modal models (`<repo>/<model>/multimodal.toml`): one classifier per
//!   modality over the same classes, the fusion rules, and tenants' quality objectives.
//! - [`split`]: split models (`<repo>/<model>/split.toml`): a transformer whose layer ranges
//!   run on different agents, its tokenizer, boundaries and privacy rule.
//! - [`profile`]: latency profiles per variant and batch size (written by `osprey profile`).
//! - [`config`]: the server configuration file.
//!
//! Nothing here does I/O beyond reading the files it is asked to parse.

pub mod config;
pub mod error;
pub mod model;
pub mod multimodal;
pub mod pipeline;
pub mod profile;
pub mod split;
pub mod tensor;

pub use error::{Error, ErrorCode};
