//! Scenario files: one TOML describing a virtual cluster, one or more models from a repository
//! (sharing the nodes, as live), tenants, a workload, timed events and the policies to
//! compare, with a seed.
//!
//! ```toml
//! name = "accuracy-scaling"
//! seed = 7
//! duration_s = 60
//! model = "spoken_digits"             # or: models = [{ name = "digits", share = 2 }, ...]
//!                                      # or: multimodal = "digit_events" (crate::multimodal)
//! model_repository = "../models"       # relative to this file
//! policies = ["most-accurate", "fixed", "profiled", "data-aware"]
//! [[nodes]]
//! name = "nano"
//! speed = 0.5                          # relative to the machine that measured profile.toml
//! workers = 1
//! [[events]]
//! at_s = 20
//! node = "nano"
//! kind = "fail"                        # fail | recover | slowdown (with factor)
//! [[tenants]]
//! name = "ops"
//! latency_slo_ms = 50
//! [workload]
//! kind = "poisson"
//! rate = 800
//! ```

use crate::workload::Workload;
use osprey_core::config::PolicyName;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub seed: u64,
    pub duration_s: f64,
    /// Width of one time-series bucket, seconds.
    #[serde(default = "one")]
    pub interval_s: f64,
    /// The model served (when `models` is empty).
    #[serde(default)]
    pub model: String,
    /// Several models on the same nodes; each arrival belongs to one, by share.
    #[serde(default)]
    pub models: Vec<ModelShare>,
    /// A multi-modal model (a `multimodal.toml` folder) instead: arrivals are its paired
    /// held-out events and `policies` are those of `crate::multimodal::POLICIES`.
    #[serde(default)]
    pub multimodal: String,
    #[serde(default = "default_repo")]
    pub model_repository: String,
    #[serde(default = "sixteen")]
    pub max_batch: u32,
    /// Coefficient of variation of service times around the profile (lognormal noise).
    #[serde(default = "jitter")]
    pub jitter_cv: f64,
    /// Serving-stack time each request spends outside the worker (protocol, queues, client),
    /// added to its observed latency; `osprey overhead` measures it (~200-300 µs here).
    #[serde(default)]
    pub request_overhead_us: f64,
    /// Time the per-input accuracy estimate takes before admission, µs (live, the gateway
    /// spends it before the dispatcher decides; `/metrics` `osprey_estimator_seconds` shows it).
    #[serde(default)]
    pub estimator_us: f64,
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub events: Vec<EventSpec>,
    pub tenants: Vec<TenantSpec>,
    pub workload: Workload,
    #[serde(default)]
    pub qos: QosWeights,
    #[serde(default)]
    pub scheduler: Knobs,
    pub policies: Vec<String>,
    /// Instance selectors to compare: `predicted` (Osprey's), `round-robin`, `least-queue`.
    #[serde(default = "default_selectors")]
    pub selectors: Vec<String>,
}

fn default_selectors() -> Vec<String> {
    vec!["predicted".into()]
}

fn one() -> f64 {
    1.0
}
fn default_repo() -> String {
    "../models".into()
}
fn sixteen() -> u32 {
    16
}
fn jitter() -> f64 {
    0.05
}
fn one_u32() -> u32 {
    1
}

/// One of several models a scenario serves.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelShare {
    pub name: String,
    /// Share of the arrivals for this model (normalised over models).
    #[serde(default = "one")]
    pub share: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// Speed relative to the profiling machine: service time = profile / speed.
    #[serde(default = "one")]
    pub speed: f64,
    #[serde(default = "one_u32")]
    pub workers: u32,
    /// Cost of one busy worker-second on this node.
    #[serde(default = "one")]
    pub cost_per_s: f64,
    /// One-way network latency to the gateway, ms.
    #[serde(default)]
    pub link_ms: f64,
    /// Link bandwidth, Mbit/s; none = unlimited.
    pub bandwidth_mbps: Option<f64>,
    /// Take `speed` from ROHE's device profile instead (see `crate::rohe`).
    pub rohe: Option<RoheSpeed>,
}

/// A node's speed as throughput(device) / throughput(reference) for one ROHE-profiled model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoheSpeed {
    /// Path to `performance_data_sample.yaml`, relative to the scenario file.
    pub file: String,
    pub model: String,
    pub device: String,
    pub reference: String,
    #[serde(default = "cpu")]
    pub unit: String,
}

fn cpu() -> String {
    "CPU".into()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Fail,
    Recover,
    /// Co-located work: the node's service times are multiplied by `factor` from now on
    /// (1.0 ends the episode).
    Slowdown,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    pub at_s: f64,
    pub node: String,
    pub kind: EventKind,
    #[serde(default = "one")]
    pub factor: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    pub latency_slo_ms: f64,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub accuracy_floor: f64,
    /// Share of the arrivals that belong to this tenant (normalised over tenants).
    #[serde(default = "one")]
    pub share: f64,
    /// Quality objective of this tenant's multi-modal events (`[tenants.quality]`, as in the
    /// server configuration); default: the server's defaults.
    #[serde(default)]
    pub quality: Option<osprey_core::multimodal::QualityObjective>,
}

/// Weights of OPD's QoS (eq. 3): Q = αV + βT − L − γE when E ≥ 0, and Q = αV + βT − L − δ(−E)
/// otherwise. Osprey normalises each term (see `engine::qos`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QosWeights {
    pub alpha: f64,
    pub beta: f64,
    pub gamma: f64,
    pub delta: f64,
}

impl Default for QosWeights {
    fn default() -> Self {
        QosWeights { alpha: 1.0, beta: 1.0, gamma: 1.0, delta: 0.1 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Knobs {
    pub urgency_weight: f64,
    pub miss_penalty: f64,
    pub fixed_variant: Option<String>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs { urgency_weight: 1.0, miss_penalty: 1.0, fixed_variant: None }
    }
}

impl Scenario {
    /// Parses and checks a scenario; returns it with the folder its relative paths start from.
    pub fn load(path: &Path) -> Result<(Scenario, PathBuf), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut s: Scenario =
            toml::from_str(&text).map_err(|e| osprey_core::model::toml_error(&text, path, &e).to_string())?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for n in &mut s.nodes {
            if let Some(r) = &n.rohe {
                let f = base.join(&r.file);
                let t = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
                n.speed = crate::rohe::relative_speed(&t, &r.model, &r.device, &r.reference, &r.unit)
                    .map_err(|e| format!("{}: node '{}': {e}", path.display(), n.name))?;
            }
        }
        s.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((s, base))
    }

    /// The served models with their arrival shares.
    pub fn model_shares(&self) -> Vec<ModelShare> {
        if self.models.is_empty() {
            vec![ModelShare { name: self.model.clone(), share: 1.0 }]
        } else {
            self.models.clone()
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if self.estimator_us.is_nan()
            || self.estimator_us < 0.0
            || self.request_overhead_us.is_nan()
            || self.request_overhead_us < 0.0
        {
            return Err("estimator_us and request_overhead_us must be non-negative".into());
        }
        if !(self.duration_s > 0.0 && self.interval_s > 0.0) {
            return Err("duration_s and interval_s must be positive".into());
        }
        if self.nodes.is_empty() || self.tenants.is_empty() || self.policies.is_empty() {
            return Err("a scenario needs nodes, tenants and policies".into());
        }
        for n in &self.nodes {
            if n.speed.is_nan() || n.speed <= 0.0 || n.workers == 0 {
                return Err(format!("node '{}': speed and workers must be positive", n.name));
            }
        }
        for e in &self.events {
            if !self.nodes.iter().any(|n| n.name == e.node) {
                return Err(format!("event at {} s names unknown node '{}'", e.at_s, e.node));
            }
        }
        if !self.multimodal.is_empty() {
            return self.check_multimodal();
        }
        if self.model.is_empty() == self.models.is_empty() {
            return Err("name the served model with either `model` or `models` (not both)".into());
        }
        if self.models.iter().any(|m| m.share.is_nan() || m.share < 0.0) {
            return Err("model shares must be non-negative".into());
        }
        for sel in &self.selectors {
            if crate::engine::selector(sel).is_none() {
                return Err(format!("unknown selector '{sel}'; known: predicted, round-robin, least-queue"));
            }
        }
        if self.selectors.is_empty() {
            return Err("selectors must not be empty".into());
        }
        for p in &self.policies {
            if PolicyName::parse(p).is_none() {
                let names: Vec<&str> = PolicyName::ALL.iter().map(|p| p.as_str()).collect();
                return Err(format!("unknown policy '{p}'; known: {}", names.join(", ")));
            }
        }
        Ok(())
    }

    fn check_multimodal(&self) -> Result<(), String> {
        if !self.model.is_empty() || !self.models.is_empty() {
            return Err(
                "a multi-modal scenario serves its `multimodal` model's members; drop `model`/`models`"
                    .into(),
            );
        }
        for t in &self.tenants {
            if let Some(q) = &t.quality {
                q.check().map_err(|e| format!("tenant '{}': {e}", t.name))?;
            }
        }
        for p in &self.policies {
            if osprey_core::multimodal::MultiModalPolicy::parse(p).is_none() {
                return Err(format!(
                    "unknown multi-modal policy '{p}'; known: {}",
                    crate::multimodal::POLICIES.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The same scenario, shortened (CI runs shipped scenarios this way).
    pub fn shortened(mut self, duration_s: f64) -> Scenario {
        let keep = duration_s / self.duration_s;
        self.duration_s = duration_s;
        for e in &mut self.events {
            e.at_s *= keep;
        }
        self
    }
}
