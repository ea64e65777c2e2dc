//! The server configuration file (`osprey serve --config FILE`).
//!
//! Parsed once, strictly (`deny_unknown_fields`), into typed values with defaults that make
//! `osprey serve` work with no file at all. Command-line flags override the file in `main`.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted HTTP body or gRPC message, bytes.
    pub max_body_bytes: usize,
    /// Largest number of samples in one request (its batch dimension).
    pub max_request_batch: u32,
    /// Requests waiting per model before new ones are refused with 503/UNAVAILABLE.
    pub max_queue: usize,
    /// Deadline applied when a request names none, milliseconds.
    pub default_timeout_ms: u64,
    /// Open HTTP connections at most; more are answered 503 at once.
    pub max_connections: usize,
    /// Time a connection has to send a request's line and headers, milliseconds; it is also
    /// the longest a kept-alive connection may wait idle for its next request.
    pub header_read_timeout_ms: u64,
    /// Time a request's body has to arrive after its headers, milliseconds (408 after).
    pub body_read_timeout_ms: u64,
    /// At shutdown (SIGTERM/SIGINT), how long admitted requests may take to finish,
    /// milliseconds; open connections get twice as long to close. Keep it below the
    /// orchestrator's own grace (Kubernetes' `terminationGracePeriodSeconds`, 30 s by default).
    pub drain_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 << 20,
            max_request_batch: 256,
            max_queue: 1024,
            default_timeout_ms: 5_000,
            max_connections: 4096,
            header_read_timeout_ms: 30_000,
            body_read_timeout_ms: 30_000,
            drain_timeout_ms: 5_000,
        }
    }
}

/// One in-process agent standing for a node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    /// Worker threads this agent may use for inference.
    #[serde(default = "default_threads")]
    pub threads: u32,
    /// The relative speed of the node this agent stands for (1.0 = this machine). Below 1 it
    /// runs every batch `1 / speed` times as long (it waits out the difference), so one
    /// machine can emulate a cluster of unequal nodes; the dispatcher plans with it.
    #[serde(default = "default_speed")]
    pub speed: f64,
}

fn default_threads() -> u32 {
    1
}

fn default_speed() -> f64 {
    1.0
}

impl AgentConfig {
    pub fn new(name: &str, threads: u32) -> AgentConfig {
        AgentConfig { name: name.into(), threads, speed: 1.0 }
    }
}

/// A tenant: who may call, with which objectives and quota.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// API keys as `sha256:<64 hex digits>` (see `osprey hash-key`); never the keys themselves.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// A file of more key hashes, one `sha256:...` per line (`#` comments and blank lines
    /// skipped), e.g. a mounted Kubernetes Secret; read when the configuration is loaded, a
    /// relative path from the configuration file's folder.
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// Latency objective: the deadline of this tenant's requests, milliseconds.
    #[serde(default = "default_slo_ms")]
    pub latency_slo_ms: u64,
    /// Accuracy objective: variants estimated below it are avoided when another can serve.
    #[serde(default)]
    pub accuracy_floor: f64,
    /// Relative importance in the scheduler's utility and priority.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Rate quota, samples per second; none means unlimited.
    pub rate: Option<f64>,
    /// Burst allowance of the quota, samples.
    pub burst: Option<u32>,
    /// Models this tenant may use; empty means all.
    #[serde(default)]
    pub models: Vec<String>,
    /// What the tenant's keys may do beyond inference (see [`Role`]).
    #[serde(default)]
    pub role: Role,
    /// Cost quota: compute milliseconds per second, counted by the profiled latency of the
    /// cheapest variant the request may use at its batch size (so a batch of 48 on the largest
    /// variant costs what it occupies, not 48 "samples"); none means unlimited.
    pub compute_rate_ms: Option<f64>,
    /// Burst allowance of the cost quota, compute milliseconds (default: one second's worth).
    pub compute_burst_ms: Option<f64>,
    /// Quality objective of this tenant's multi-modal requests (`[tenants.quality]`); none:
    /// the defaults of [`crate::multimodal::QualityObjective`].
    #[serde(default)]
    pub quality: Option<crate::multimodal::QualityObjective>,
}

/// Roles, each including the one before it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Inference, metadata, readiness and statistics of the models the tenant may use.
    #[default]
    Tenant,
    /// Also `/metrics`, `/v2/cluster`, every model's metadata and statistics, the repository's
    /// problems: read-only operations (a Prometheus scraper's key).
    Monitor,
    /// Also changes to the cluster: loading and unloading variants on nodes.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tenant => "tenant",
            Role::Monitor => "monitor",
            Role::Admin => "admin",
        }
    }
}

fn default_slo_ms() -> u64 {
    1000
}

fn default_weight() -> f64 {
    1.0
}

/// Which per-request scheduling policy the gateway runs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Utility scheduling with per-input (data-aware) accuracy estimates.
    #[default]
    DataAware,
    /// Utility scheduling with profiled average accuracy.
    Profiled,
    /// Utility scheduling with per-class accuracy weighted by the recent label mix.
    PerClass,
    /// FIFO dynamic batching, always the most accurate variant.
    MostAccurate,
    /// FIFO dynamic batching, always the fastest variant.
    Fastest,
    /// FIFO dynamic batching on `fixed_variant` (Triton-like: no variant choice).
    Fixed,
    /// Earliest deadline first on `fixed_variant`.
    Edf,
    /// Least laxity first, most accurate variant that fits.
    Llf,
    /// DREAM: drop early if it cannot finish, else rank by urgency.
    Dream,
    /// A seeded random variant per batch.
    Random,
    /// The cheapest variant meeting the accuracy floor.
    Greedy,
}

impl PolicyName {
    pub const ALL: [PolicyName; 11] = [
        PolicyName::DataAware,
        PolicyName::Profiled,
        PolicyName::PerClass,
        PolicyName::MostAccurate,
        PolicyName::Fastest,
        PolicyName::Fixed,
        PolicyName::Edf,
        PolicyName::Llf,
        PolicyName::Dream,
        PolicyName::Random,
        PolicyName::Greedy,
    ];

    pub fn parse(s: &str) -> Option<PolicyName> {
        PolicyName::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::DataAware => "data-aware",
            PolicyName::Profiled => "profiled",
            PolicyName::PerClass => "per-class",
            PolicyName::MostAccurate => "most-accurate",
            PolicyName::Fastest => "fastest",
            PolicyName::Fixed => "fixed",
            PolicyName::Edf => "edf",
            PolicyName::Llf => "llf",
            PolicyName::Dream => "dream",
            PolicyName::Random => "random",
            PolicyName::Greedy => "greedy",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSection {
    pub policy: PolicyName,
    /// Variant for `policy = "fixed"`; default: each model's middle variant.
    pub fixed_variant: Option<String>,
    /// β: weight of urgency against accuracy in the priority.
    pub urgency_weight: f64,
    /// λ: utility lost when a request misses its deadline.
    pub miss_penalty: f64,
    /// How multi-modal requests are answered (`quality-driven`, or a baseline:
    /// `no-refinement`, `profiled`, `fixed-ensemble`, `edf`, `llf`, `dream`).
    pub multimodal: crate::multimodal::MultiModalPolicy,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            policy: PolicyName::default(),
            fixed_variant: None,
            urgency_weight: 1.0,
            miss_penalty: 1.0,
            multimodal: crate::multimodal::MultiModalPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub http_addr: String,
    pub grpc_addr: String,
    pub model_repository: Option<PathBuf>,
    pub limits: Limits,
    /// Largest batch the dynamic batcher forms (also capped by each model's `max_batch_size`).
    pub max_batch: u32,
    /// Local agents; empty means one agent with one thread per available core (max 4).
    pub agents: Vec<AgentConfig>,
    /// Tenants; none means one `default` tenant with no key, no quota and
    /// `limits.default_timeout_ms` as its latency objective.
    pub tenants: Vec<TenantConfig>,
    pub scheduler: SchedulerSection,
    pub cluster: ClusterSection,
    /// TLS for both listeners; none: plaintext (warned about off loopback).
    pub tls: Option<TlsSection>,
    /// The per-interval control loop for pipelines; none: stages choose per batch.
    pub control: Option<ControlSection>,
    /// The ONNX Runtime library (`libonnxruntime.so`) for models tract cannot run; none:
    /// `$OSPREY_ONNXRUNTIME`, then beside the executable.
    pub onnxruntime: Option<PathBuf>,
}

/// The control loop (OPD's per-interval configuration) of every served pipeline.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// Seconds between decisions (1 to 3600; the OPD paper's 10 by default).
    pub interval_s: f64,
    /// `random`, `greedy`, `ipa` or `opd`.
    pub policy: String,
    /// `last`, `ewma` or `lstm`.
    pub predictor: String,
    /// Weights of `opd` and `lstm` (safetensors with their `.json` sidecar).
    pub opd_weights: Option<PathBuf>,
    pub predictor_weights: Option<PathBuf>,
    /// Cluster capacity and security limits every decision is bounded by.
    pub resources: crate::pipeline::Limits,
    pub objective: crate::pipeline::Weights,
    pub reward: crate::pipeline::RewardWeights,
    /// Seed of the `random` policy.
    pub seed: u64,
    /// Single models (not pipeline stages) the loop configures as one-stage pipelines:
    /// `["*"]` (the default) all of them, `[]` none (their variant is then chosen per batch).
    pub models: Vec<String>,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            interval_s: 10.0,
            policy: "ipa".into(),
            predictor: "ewma".into(),
            opd_weights: None,
            predictor_weights: None,
            resources: crate::pipeline::Limits::default(),
            objective: crate::pipeline::Weights::default(),
            reward: crate::pipeline::RewardWeights::default(),
            seed: 1,
            models: vec!["*".into()],
        }
    }
}

/// The gateway's certificate (PEM files; relative paths are relative to the working
/// directory).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How remote agents join.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// File holding the join token; created (mode 0600) with a random token when missing.
    /// Default: `$OSPREY_STATE_DIR/join-token`, else `$XDG_STATE_HOME/osprey/join-token`, else
    /// `~/.local/state/osprey/join-token`. `$OSPREY_JOIN_TOKEN` overrides the file.
    pub join_token_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http_addr: "0.0.0.0:8000".into(),
            grpc_addr: "0.0.0.0:8001".into(),
            model_repository: None,
            limits: Limits::default(),
            max_batch: 16,
            agents: Vec::new(),
            tenants: Vec::new(),
            scheduler: SchedulerSection::default(),
            cluster: ClusterSection::default(),
            tls: None,
            control: None,
            onnxruntime: None,
        }
    }
}

/// `sha256:<64 hex digits>`, the only form keys are configured in.
fn is_key_hash(k: &str) -> bool {
    let hex = k.strip_prefix("sha256:").unwrap_or("");
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<ServerConfig> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        let mut c = Self::parse(&text, path)?;
        c.read_key_files(path.parent().unwrap_or(Path::new(".")))?;
        Ok(c)
    }

    /// Appends each tenant's `api_keys_file` hashes to its `api_keys` (checked like them).
    pub fn read_key_files(&mut self, base: &Path) -> Result<()> {
        for t in &mut self.tenants {
            let Some(file) = &t.api_keys_file else { continue };
            let file = base.join(file);
            let bad = |m: String| {
                Error::invalid(format!("tenant '{}': api_keys_file {}: {m}", t.name, file.display()))
            };
            let text = std::fs::read_to_string(&file).map_err(|e| bad(e.to_string()))?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                if !is_key_hash(line) {
                    return Err(bad(format!(
                        "line {}: expected 'sha256:<64 hex digits>' (make one with `osprey hash-key`)",
                        i + 1
                    )));
                }
                t.api_keys.push(line.to_string());
            }
        }
        Ok(())
    }

    pub fn parse(text: &str, path: &Path) -> Result<ServerConfig> {
        let c: ServerConfig = toml::from_str(text).map_err(|e| crate::model::toml_error(text, path, &e))?;
        let l = &c.limits;
        if c.max_batch == 0
            || l.max_request_batch == 0
            || l.max_queue == 0
            || l.max_connections == 0
            || l.header_read_timeout_ms == 0
            || l.body_read_timeout_ms == 0
        {
            return Err(Error::invalid(format!(
                "{}: max_batch, max_request_batch, max_queue, max_connections and the read timeouts must be positive",
                path.display()
            )));
        }
        if c.scheduler.multimodal == crate::multimodal::MultiModalPolicy::Oracle {
            return Err(Error::invalid(format!(
                "{}: [scheduler] multimodal = \"oracle\" is the simulator's hindsight bound; a server \
                 cannot know which answers are right (use quality-driven, no-refinement, profiled, \
                 fixed-ensemble, edf, llf or dream)",
                path.display()
            )));
        }
        if let Some(k) = &c.control {
            let bad = |m: &str| Error::invalid(format!("{}: [control] {m}", path.display()));
            if !(1.0..=3600.0).contains(&k.interval_s) {
                return Err(bad("interval_s must be within 1..3600"));
            }
            if !["random", "greedy", "ipa", "opd"].contains(&k.policy.as_str()) {
                return Err(bad("policy must be random, greedy, ipa or opd"));
            }
            if !["last", "ewma", "lstm"].contains(&k.predictor.as_str()) {
                return Err(bad("predictor must be last, ewma or lstm"));
            }
            if (k.policy == "opd" && k.opd_weights.is_none())
                || (k.predictor == "lstm" && k.predictor_weights.is_none())
            {
                return Err(bad("opd needs opd_weights and lstm needs predictor_weights"));
            }
            let r = &k.resources;
            if r.f_max == 0
                || r.b_max == 0
                || r.w_max.is_nan()
                || r.w_max <= 0.0
                || r.cores_max.is_nan()
                || r.cores_max <= 0.0
            {
                return Err(bad("[control.resources] f_max, b_max, w_max and cores_max must be positive"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &c.tenants {
            let bad = |m: String| Error::invalid(format!("{}: tenant '{}': {m}", path.display(), t.name));
            if !crate::model::is_valid_name(&t.name) || !names.insert(t.name.clone()) {
                return Err(bad("names must be unique and match [A-Za-z0-9_.-]".into()));
            }
            for k in &t.api_keys {
                if !is_key_hash(k) {
                    return Err(bad(
                        "api_keys must be 'sha256:<64 hex digits>' (make one with `osprey hash-key`)".into(),
                    ));
                }
            }
            if !(t.weight > 0.0 && t.weight.is_finite() && (0.0..=1.0).contains(&t.accuracy_floor)) {
                return Err(bad("weight must be positive and accuracy_floor within 0..1".into()));
            }
            if let Some(q) = &t.quality {
                q.check().map_err(bad)?;
            }
            let positive = |x: Option<f64>| x.is_none_or(|r| r > 0.0 && r.is_finite());
            if t.latency_slo_ms == 0
                || !positive(t.rate)
                || !positive(t.compute_rate_ms)
                || !positive(t.compute_burst_ms)
            {
                return Err(bad(
                    "latency_slo_ms, rate, compute_rate_ms and compute_burst_ms must be positive".into(),
                ));
            }
        }
        let s = &c.scheduler;
        if !(s.urgency_weight >= 0.0 && s.miss_penalty >= 0.0) {
            return Err(Error::invalid(format!(
                "{}: urgency_weight and miss_penalty must be non-negative",
                path.display()
            )));
        }
        if c.agents.iter().any(|a| a.threads == 0) {
            return Err(Error::invalid(format!("{}: an agent needs at least one thread", path.display())));
        }
        if let Some(a) = c.agents.iter().find(|a| !(a.speed > 0.0 && a.speed <= 1.0)) {
            return Err(Error::invalid(format!(
                "{}: agent '{}': speed must be within (0, 1] (an in-process agent cannot run faster than this machine)",
                path.display(),
                a.name
            )));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_section_parses_and_refuses_what_it_cannot_run() {
        let p = Path::new("osprey.toml");
        let c = ServerConfig::parse("[control]\npolicy = \"greedy\"\n[control.resources]\nf_max = 2\n", p)
            .unwrap();
        let k = c.control.unwrap();
        assert_eq!(
            (k.policy.as_str(), k.interval_s, k.resources.f_max, k.resources.b_max),
            ("greedy", 10.0, 2, 32)
        );
        for bad in [
            "[control]\npolicy = \"best\"\n",
            "[control]\ninterval_s = 0.5\n",
            "[control]\npolicy = \"opd\"\n",
            "[control]\npredictor = \"lstm\"\n",
            "[control.resources]\nf_max = 0\n",
            "[control]\nbogus = 1\n",
        ] {
            assert!(ServerConfig::parse(bad, p).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_file_gives_defaults_and_unknown_keys_fail() {
        let p = Path::new("osprey.toml");
        assert_eq!(ServerConfig::parse("", p).unwrap(), ServerConfig::default());
        let c = ServerConfig::parse("http_addr = \"127.0.0.1:9\"\n[limits]\nmax_queue = 3\n", p).unwrap();
        assert_eq!(c.limits.max_queue, 3);
        let e = ServerConfig::parse("\n[limits]\nmax_qeue = 3\n", p).unwrap_err();
        assert!(e.message.contains("osprey.toml:3:") && e.message.contains("max_qeue"), "{e}");
        let key = format!("sha256:{}", "ab".repeat(32));
        let t = format!(
            "[scheduler]\npolicy = \"profiled\"\n[[tenants]]\nname = \"a\"\napi_keys = [\"{key}\"]\nrate = 5.0\n"
        );
        let c = ServerConfig::parse(&t, p).unwrap();
        assert_eq!((c.scheduler.policy, c.tenants[0].latency_slo_ms), (PolicyName::Profiled, 1000));
        let e = ServerConfig::parse("[[tenants]]\nname = \"a\"\napi_keys = [\"secret\"]\n", p).unwrap_err();
        assert!(e.message.contains("hash-key"), "{e}");
        let e = ServerConfig::parse("[scheduler]\npolicy = \"magic\"\n", p).unwrap_err();
        assert!(e.message.contains("osprey.toml:2:") && e.message.contains("data-aware"), "{e}");
    }
}
