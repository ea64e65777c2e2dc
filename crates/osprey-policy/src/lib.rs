//! Osprey's decision logic, sans-IO.
//!
//! Every function here takes a snapshot and the current time (microseconds on the driver's
//! clock) and returns decisions. Nothing reads a clock, spawns, touches a socket or the
//! environment, so the live gateway and the simulator drive the same code.
//!
//! # Layout
//! - [`scheduler`]: per-model queue, admission, priority, expiry, batch and variant choice
//!   (the SneakPeek-style utility rule and the FIFO baselines).
//! - [`estimate`]: accuracy estimators — profiled, per-class, data-aware — and calibration
//!   metrics.
//! - [`instance`]: which node runs a batch (predicted completion, contention- and
//!   failure-aware; round-robin and least-queue baselines).
//! - [`dispatch`]: the cluster dispatcher — every model's scheduler, membership and health,
//!   free workers and backlog, batches in flight, retry/failover — events in, actions out.
//! - [`placement`]: which node loads which variant, `solve(problem, previous)`.
//! - [`quota`]: per-tenant token buckets.
//! - [`configure`]: per-control-interval pipeline configuration (OPD eq. 1-4, 7): the
//!   objective, security limits, Random / Greedy / exact IPA policies behind one trait.
//! - [`predict`]: load predictors (last value, EWMA; the LSTM is in `osprey-learn`), SMAPE.
//! - [`refine`]: cross-modal refinement of one multi-modal request (which modality and variant
//!   answers first, whether and with what to refine, fusion).
//! - [`setup`]: a policy name + model -> scheduling rule and estimator (shared by drivers).

pub mod configure;
pub mod dispatch;
pub mod estimate;
pub mod instance;
pub mod placement;
pub mod predict;
pub mod quota;
pub mod refine;
pub mod scheduler;
pub mod setup;
pub mod split;

/// Time on the driver's clock, microseconds.
pub type Micros = u64;
