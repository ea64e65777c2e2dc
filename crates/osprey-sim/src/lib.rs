//! A discrete-event simulator that drives Osprey's own policies on a virtual cluster.
//!
//! # Layout
//! - [`workload`]: arrival processes (Poisson, gamma, OPD's steady-low / fluctuating /
//!   steady-high shapes, bursty, CSV trace replay) generated from a seed.
//! - [`scenario`]: the scenario file (cluster, model, tenants, workload, events, policies).
//! - [`engine`]: the event loop with a virtual clock. It owns an
//!   `osprey_policy::scheduler::Scheduler` built by `osprey_policy::setup` exactly as the live
//!   gateway builds it, and answers every request exactly once.
//! - [`rohe`]: node speeds imported from ROHE's Jetson-class device profiles.
//! - [`report`]: summary and time-series CSV, SVG plots.
//!
//! Accuracy outcomes are real: each simulated request carries one sample of the model's
//! held-out evaluation set, and its answer is right exactly when that variant was right on
//! that sample.

pub mod engine;
pub mod report;
pub mod rohe;
pub mod scenario;
pub mod workload;
