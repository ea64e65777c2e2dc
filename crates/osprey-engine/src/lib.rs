//! Running models on one node.
//!
//! # Layout
//! - [`session`]: an ONNX variant loaded through tract with a symbolic batch dimension; the
//!   plan is built and optimised once and shared by every worker thread. The engine seam:
//!   a session runs on tract or on onnxruntime, the rest of Osprey does not see which.
//! - [`onnxruntime`]: the second engine, ONNX Runtime loaded at run time for graphs tract
//!   cannot translate.
//! - [`batch`]: concatenating requests into one batch and splitting outputs back.
//! - [`explain`]: occlusion explanations (masked copies of an input, the attribution).
//! - [`profile`]: measuring latency per batch size (p50/p90/p99) and throughput.
//! - [`split`]: a transformer cut at layer boundaries, ranges of layers run on different nodes.
//! - [`text`]: text into token inputs (the model's own tokenizer).
//!
//! tract is pure Rust (no native library to ship to edge nodes, one static binary), runs the
//! zoo's graphs unchanged, and can cut a graph at a named tensor, which split inference needs.

pub mod batch;
pub mod explain;
pub mod onnxruntime;
pub mod profile;
pub mod session;
pub mod split;
pub mod text;

pub use session::Session;
