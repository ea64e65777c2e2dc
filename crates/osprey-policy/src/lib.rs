//! Osprey's decision logic, sans-IO.
//!
//! Every function here takes a snapshot and the current time (microseconds on the driver's
//! clock) and returns decisions. Nothing reads a clock, spawns, touches a socket or the
//! environment, so the live gateway and the simulator drive the same code.
//!
//! # Layout
//! - [`select`]: which variant answers a request (per-request variant choice).
//! - [`batcher`]: which queued requests run together, and which have expired.

pub mod batcher;
pub mod select;

/// Time on the driver's clock, microseconds.
pub type Micros = u64;
