//! The live system: Open Inference Protocol over HTTP and gRPC in front of a gateway that
//! queues, batches and dispatches requests to agents running the engine.
//!
//! # Layout
//! - [`gateway`]: the model table, request validation (only [`gateway::ValidRequest`]s enter
//!   a queue), tenant admission, per-input estimates, statistics.
//! - [`cluster`]: the live driver of `osprey_policy::dispatch::Dispatcher` (every cluster
//!   decision is made there); remote agents and the `osprey.agent.v1.AgentGateway` service.
//! - [`controller`]: the per-interval control loop of pipelines (predictor → configuration
//!   policy → every stage's variant, batch limit and replicas applied to the dispatcher), and
//!   of single models as one-stage pipelines.
//! - [`codec`]: the gRPC codec (undecodable messages are INVALID_ARGUMENT).
//! - [`agent`]: the `Agent` seam (in-process worker pool, remote, fake) and its work item.
//! - [`pipeline`]: pipelines addressed as one model: stages chained in the gateway, the
//!   deadline split over them.
//! - [`multimodal`]: multi-modal models addressed as one model: the parts per modality, the
//!   calls `osprey_policy::refine` asks for, the fused answer.
//! - [`protocol`]: what REST and gRPC share: caller, typed response parameters, edge metrics.
//! - [`http`]: REST routes, JSON tensors and Triton's binary tensor extension.
//! - [`grpc`]: `inference.GRPCInferenceService` (the `.proto` lives in `proto/`).
//! - [`heap`]: the counting allocator agents measure a variant's memory with at load.
//! - [`join`]: the cluster join token agents present on `Attach`.
//! - [`listener`]: HTTP connections: count, timeouts, framing and size checks.
//! - [`node`]: the node side of the agent protocol (`osprey agent --join`).
//! - [`split_node`]: the agent's layer ranges of split models, its peer service (activations
//!   agent to agent) and its capacity profile (units, links).
//! - [`split`]: the gateway's driver of split inference: tokenizing, the planner and epochs
//!   of `osprey_policy::split`, requests through the chain.
//! - [`metrics`]: Prometheus families served at `/metrics`.
//! - [`server`]: binds both protocols to injected listeners and drains on shutdown.
//! - [`tls`]: certificates for both listeners and the agent link (rustls).
//! - [`tenants`]: API keys (hashed, constant-time), objectives, rate quotas.
//! - [`repository`]: model control (Triton's `none | poll | explicit`): loading, reloading
//!   and unloading models while serving, and the repository index.

pub mod agent;
pub mod cluster;
pub mod codec;
pub mod controller;
pub mod dashboard;
pub mod gateway;
pub mod grpc;
pub mod heap;
pub mod http;
pub mod join;
pub mod listener;
pub mod metrics;
pub mod multimodal;
pub mod node;
pub mod pipeline;
pub mod protocol;
pub mod repository;
pub mod server;
pub mod split;
pub mod split_node;
pub mod tenants;
pub mod timeline;
pub mod tls;

/// Generated Open Inference Protocol messages and service.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}

/// Generated node-agent protocol (`proto/agent.proto`).
pub mod agent_pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("osprey.agent.v1");
}

pub use gateway::Gateway;
pub use server::{Listeners, serve};

/// Server name and version reported by server metadata.
pub const SERVER_NAME: &str = "osprey";
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Protocol extensions this server implements (server metadata `extensions`).
pub const EXTENSIONS: &[&str] =
    &["binary_tensor_data", "model_configuration", "statistics", "parameters", "model_repository"];
