//! A discrete-event simulator that drives Osprey's own policies on a virtual cluster.
//!
//! # Layout
//! - [`workload`]: arrival processes (Poisson, gamma, OPD's steady-low / fluctuating /
//!   steady-high shapes, bursty, CSV trace replay) generated from a seed.
//! - [`scenario`]: the scenario file (cluster, model, tenants, workload, events, policies).
//! - [`engine`]: the event loop with a virtual clock, a thin driver of
//!   `osprey_policy::dispatch::Dispatcher` (the object the live gateway drives), serving one
//!   or several models on shared nodes; every request ends exactly once.
//! - [`pipeline`]: OPD's experiment: a repository pipeline as a fluid queue per second, a
//!   configuration policy every control interval, the paper's Q, C, J and reward per interval.
//! - [`split`]: split inference of a large model over many nodes: the live planner, reviser
//!   and epoch machine driven by chained FIFO stages and links (latency, throughput, re-split).
//! - [`rohe`]: node speeds imported from ROHE's Jetson-class device profiles.
//! - [`report`]: summary and time-series CSV, SVG plots.
//!
//! Accuracy outcomes are real: each simulated request carries one sample of the model's
//! held-out evaluation set, and its answer is right exactly when that variant was right on
//! that sample.

pub mod engine;
pub mod multimodal;
pub mod pipeline;
pub mod report;
pub mod rohe;
pub mod scenario;
pub mod split;
pub mod workload;
