//! Prometheus metrics, Triton-like: requests by model, variant and outcome; queue and compute
//! (input, infer, output) durations; pending requests; batch sizes; per tenant: outcomes (SLO
//! attainment = met / all), estimated accuracy of answers; estimator and decision time.
//!
//! The series a successful request touches are created once per model ([`ModelMetrics`]), so
//! the request path builds no label strings and hashes no label sets; error outcomes, which
//! are rare, still go through the families.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub variant: String,
    /// `success` or an error label (`deadline_exceeded`, `invalid_argument`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VariantLabels {
    pub model: String,
    pub variant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
    pub model: String,
    /// `met`, `late`, or an error label (`resource_exhausted`, `unavailable`,
    /// `deadline_exceeded`, ...). SLO attainment = met / all.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// `http` or `grpc`.
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModelLabels {
    pub tenant: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SplitStageLabels {
    pub model: String,
    pub node: String,
    /// The stage's units, `start..end`.
    pub units: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SplitNodeLabels {
    pub model: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantOnlyLabels {
    pub tenant: String,
}

type FGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Per-node gauges, refreshed from the cluster at each scrape ([`Metrics::set_nodes`]).
struct NodeFamilies {
    up: Family<NodeLabels, Gauge>,
    workers: Family<NodeLabels, Gauge>,
    busy: Family<NodeLabels, Gauge>,
    slowdown: Family<NodeLabels, FGauge>,
    cpu_load: Family<NodeLabels, FGauge>,
    mean_service: Family<NodeLabels, FGauge>,
    failures: Family<NodeLabels, Gauge>,
    memory_used: Family<NodeLabels, Gauge>,
    memory_offered: Family<NodeLabels, Gauge>,
}

type Hist = Family<VariantLabels, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(25e-6, 2.0, 16))
}

fn batch_sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub queue: Hist,
    pub compute_input: Hist,
    pub compute_infer: Hist,
    pub compute_output: Hist,
    pub batch_size: Hist,
    pub pending: Family<ModelLabels, Gauge>,
    pub tenant_requests: Family<TenantLabels, Counter>,
    pub tenant_accuracy: Family<TenantModelLabels, Histogram, fn() -> Histogram>,
    pub estimator: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub decision: Histogram,
    /// Time inside the server per inference request, HTTP: from the routed request (headers
    /// parsed) to the response handed back to the connection; gRPC: from the decoded message
    /// to the response message.
    pub http_duration: Histogram,
    pub grpc_duration: Histogram,
    /// Open HTTP connections.
    pub connections_open: Gauge,
    /// HTTP connections answered 503 because `limits.max_connections` were open.
    pub connections_refused: Counter,
    /// Control-loop decisions per pipeline (`model` = the pipeline), and their time.
    pub control_decisions: Family<ModelLabels, Counter>,
    /// Split models, refreshed from their drivers at each scrape ([`Metrics::set_split`]).
    split_epoch: Family<ModelLabels, Gauge>,
    split_stage: Family<SplitStageLabels, Gauge>,
    split_speed: Family<SplitNodeLabels, FGauge>,
    split_link_latency: Family<LinkLabels, FGauge>,
    split_link_bandwidth: Family<LinkLabels, FGauge>,
    split_requests: Family<RequestLabels, Gauge>,
    pub control_duration: Histogram,
    nodes: NodeFamilies,
    /// Each tenant's SLO attainment over the last minute ([`Metrics::set_attainment`]).
    tenant_attainment: Family<TenantOnlyLabels, FGauge>,
    registry: Registry,
}

/// Fine buckets (1 µs × 1.1^k up to ~1 s) for per-request server time, so that `osprey
/// overhead` can read a p50 from them within ~5%.
fn fine_seconds() -> Histogram {
    Histogram::new(exponential_buckets(1e-6, 1.1, 146))
}

fn accuracy_buckets() -> Histogram {
    Histogram::new([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("osprey");
        let requests = Family::<RequestLabels, Counter>::default();
        let mk = || Hist::new_with_constructor(seconds as fn() -> Histogram);
        let (queue, compute_input, compute_infer, compute_output) = (mk(), mk(), mk(), mk());
        let batch_size = Hist::new_with_constructor(batch_sizes as fn() -> Histogram);
        let pending = Family::<ModelLabels, Gauge>::default();
        let tenant_requests = Family::<TenantLabels, Counter>::default();
        let tenant_accuracy = Family::new_with_constructor(accuracy_buckets as fn() -> Histogram);
        let estimator = Family::new_with_constructor(seconds as fn() -> Histogram);
        let decision = Histogram::new(exponential_buckets(1e-6, 2.0, 16));
        let durations =
            Family::<ProtocolLabels, Histogram, fn() -> Histogram>::new_with_constructor(fine_seconds);
        registry.register(
            "request_duration_seconds",
            "Time inside the server per inference request, by protocol",
            durations.clone(),
        );
        let http_duration = durations.get_or_create(&ProtocolLabels { protocol: "http".into() }).clone();
        let grpc_duration = durations.get_or_create(&ProtocolLabels { protocol: "grpc".into() }).clone();
        registry.register(
            "tenant_requests",
            "Requests per tenant by outcome (met, late, or error label)",
            tenant_requests.clone(),
        );
        registry.register(
            "tenant_estimated_accuracy",
            "Estimated accuracy of answered requests per tenant",
            tenant_accuracy.clone(),
        );
        registry.register(
            "estimator_duration_seconds",
            "Time spent estimating per-variant accuracy for a request",
            estimator.clone(),
        );
        registry.register(
            "decision_duration_seconds",
            "Time the scheduler spends per admission or batch decision",
            decision.clone(),
        );
        registry.register("requests", "Inference requests by model, variant and outcome", requests.clone());
        registry.register(
            "queue_duration_seconds",
            "Time requests wait before their batch starts",
            queue.clone(),
        );
        registry.register(
            "compute_input_duration_seconds",
            "Time to assemble a batch's input tensors",
            compute_input.clone(),
        );
        registry.register(
            "compute_infer_duration_seconds",
            "Time the engine spends executing a batch",
            compute_infer.clone(),
        );
        registry.register(
            "compute_output_duration_seconds",
            "Time to split a batch's outputs per request",
            compute_output.clone(),
        );
        registry.register("batch_size", "Samples per executed batch", batch_size.clone());
        registry.register("pending_requests", "Requests admitted and not yet answered", pending.clone());
        let connections_open = Gauge::default();
        let connections_refused = Counter::default();
        registry.register("http_connections_open", "Open HTTP connections", connections_open.clone());
        registry.register(
            "http_connections_refused",
            "HTTP connections refused at accept because limits.max_connections were open",
            connections_refused.clone(),
        );
        let control_decisions = Family::<ModelLabels, Counter>::default();
        let control_duration = Histogram::new(exponential_buckets(1e-6, 2.0, 24));
        registry.register(
            "control_decisions",
            "Configurations the control loop applied, per pipeline (label model)",
            control_decisions.clone(),
        );
        registry.register(
            "control_decision_duration_seconds",
            "Time the control loop's policy spends per decision",
            control_duration.clone(),
        );
        let split_epoch = Family::<ModelLabels, Gauge>::default();
        let split_stage = Family::<SplitStageLabels, Gauge>::default();
        let split_speed = Family::<SplitNodeLabels, FGauge>::default();
        let split_link_latency = Family::<LinkLabels, FGauge>::default();
        let split_link_bandwidth = Family::<LinkLabels, FGauge>::default();
        let split_requests = Family::<RequestLabels, Gauge>::default();
        registry.register(
            "split_epoch",
            "Current plan epoch of each split model (0: none)",
            split_epoch.clone(),
        );
        registry.register(
            "split_stage_units",
            "Units each node runs in the current plan of a split model (label units: start..end)",
            split_stage.clone(),
        );
        registry.register(
            "split_speed_factor",
            "Observed over profiled compute of each node's stage (EWMA; 1 = as profiled)",
            split_speed.clone(),
        );
        registry.register(
            "split_link_latency_ms",
            "One-way latency of each measured link between agents (from = the measuring agent)",
            split_link_latency.clone(),
        );
        registry.register(
            "split_link_bandwidth_bytes_per_us",
            "Bandwidth of each measured link between agents, bytes per microsecond (= MB/s)",
            split_link_bandwidth.clone(),
        );
        registry.register(
            "split_requests",
            "Sentences answered by each split model (outcome: success, retried or failed)",
            split_requests.clone(),
        );
        let nodes = NodeFamilies {
            up: Family::default(),
            workers: Family::default(),
            busy: Family::default(),
            slowdown: Family::default(),
            cpu_load: Family::default(),
            mean_service: Family::default(),
            failures: Family::default(),
            memory_used: Family::default(),
            memory_offered: Family::default(),
        };
        registry.register("node_up", "Nodes attached to the gateway (1 while attached)", nodes.up.clone());
        registry.register(
            "node_workers",
            "Worker threads of each node (its thread budget)",
            nodes.workers.clone(),
        );
        registry.register(
            "node_busy_workers",
            "Workers of each node running a batch now",
            nodes.busy.clone(),
        );
        registry.register(
            "node_slowdown",
            "Observed over profiled service time of each node (EWMA; 1 = as profiled)",
            nodes.slowdown.clone(),
        );
        registry.register(
            "node_cpu_load",
            "Each node's CPU load as its agent reports it",
            nodes.cpu_load.clone(),
        );
        registry.register(
            "node_mean_service_seconds",
            "Each node's recent mean batch service time",
            nodes.mean_service.clone(),
        );
        registry.register(
            "node_recent_failures",
            "Recent failed batches of each node (the instance selector avoids it while non-zero)",
            nodes.failures.clone(),
        );
        registry.register(
            "node_memory_used_mb",
            "Memory the node's loaded instances take, MB (as measured at load)",
            nodes.memory_used.clone(),
        );
        registry.register(
            "node_memory_offered_mb",
            "Memory the node offers for instances, MB (0: preloaded in-process agent)",
            nodes.memory_offered.clone(),
        );
        let tenant_attainment = Family::<TenantOnlyLabels, FGauge>::default();
        registry.register(
            "tenant_slo_attainment",
            "Answers on time over all requests of each tenant in the last 60 s (refusals count as misses; absent without requests)",
            tenant_attainment.clone(),
        );
        Metrics {
            nodes,
            tenant_attainment,
            split_epoch,
            split_stage,
            split_speed,
            split_link_latency,
            split_link_bandwidth,
            split_requests,
            control_decisions,
            control_duration,
            connections_open,
            connections_refused,
            requests,
            queue,
            compute_input,
            compute_infer,
            compute_output,
            batch_size,
            pending,
            tenant_requests,
            tenant_accuracy,
            estimator,
            decision,
            http_duration,
            grpc_duration,
            registry,
        }
    }

    /// One control-loop decision for `pipeline`, taking `seconds`.
    pub fn control_decision(&self, pipeline: &str, seconds: f64) {
        self.control_decisions.get_or_create(&ModelLabels { model: pipeline.into() }).inc();
        self.control_duration.observe(seconds);
    }

    pub fn request(&self, model: &str, variant: &str, outcome: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.into(),
                variant: variant.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn tenant_outcome(&self, tenant: &str, model: &str, outcome: &str) {
        self.tenant_requests
            .get_or_create(&TenantLabels {
                tenant: tenant.into(),
                model: model.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn tenant_accuracy(&self, tenant: &str, model: &str, accuracy: f64) {
        self.tenant_accuracy
            .get_or_create(&TenantModelLabels { tenant: tenant.into(), model: model.into() })
            .observe(accuracy);
    }

    /// Creates the series of one model's request path: per variant, per tenant (in the
    /// tenants' index order).
    pub fn for_model(&self, model: &str, variants: &[String], tenants: &[String]) -> ModelMetrics {
        let m = || ModelLabels { model: model.into() };
        let v = |variant: &str| VariantLabels { model: model.into(), variant: variant.into() };
        ModelMetrics {
            pending: self.pending.get_or_create(&m()).clone(),
            estimator: self.estimator.get_or_create(&m()).clone(),
            variants: variants
                .iter()
                .map(|name| VariantMetrics {
                    success: self
                        .requests
                        .get_or_create(&RequestLabels {
                            model: model.into(),
                            variant: name.clone(),
                            outcome: "success".into(),
                        })
                        .clone(),
                    batch_size: self.batch_size.get_or_create(&v(name)).clone(),
                    queue: self.queue.get_or_create(&v(name)).clone(),
                    compute_input: self.compute_input.get_or_create(&v(name)).clone(),
                    compute_infer: self.compute_infer.get_or_create(&v(name)).clone(),
                    compute_output: self.compute_output.get_or_create(&v(name)).clone(),
                })
                .collect(),
            tenants: tenants
                .iter()
                .map(|t| {
                    let outcome = |o: &str| {
                        self.tenant_requests
                            .get_or_create(&TenantLabels {
                                tenant: t.clone(),
                                model: model.into(),
                                outcome: o.into(),
                            })
                            .clone()
                    };
                    TenantMetrics {
                        met: outcome("met"),
                        late: outcome("late"),
                        accuracy: self
                            .tenant_accuracy
                            .get_or_create(&TenantModelLabels { tenant: t.clone(), model: model.into() })
                            .clone(),
                    }
                })
                .collect(),
        }
    }

    /// Replaces the split-model series with what the drivers report now.
    pub fn set_split(&self, all: &[crate::split::SplitStatus]) {
        self.split_epoch.clear();
        self.split_stage.clear();
        self.split_speed.clear();
        self.split_link_latency.clear();
        self.split_link_bandwidth.clear();
        self.split_requests.clear();
        for s in all {
            let m = ModelLabels { model: s.model.clone() };
            self.split_epoch.get_or_create(&m).set(s.epoch.unwrap_or(0) as i64);
            for (node, units) in &s.stages {
                let n = units
                    .split_once("..")
                    .and_then(|(a, b)| Some(b.parse::<i64>().ok()? - a.parse::<i64>().ok()?));
                self.split_stage
                    .get_or_create(&SplitStageLabels {
                        model: s.model.clone(),
                        node: node.clone(),
                        units: units.clone(),
                    })
                    .set(n.unwrap_or(0));
            }
            for n in &s.nodes {
                self.split_speed
                    .get_or_create(&SplitNodeLabels { model: s.model.clone(), node: n.name.clone() })
                    .set(n.speed_factor);
                for (to, (ms, bw)) in &n.links {
                    let l = LinkLabels { from: n.name.clone(), to: to.clone() };
                    self.split_link_latency.get_or_create(&l).set(*ms);
                    self.split_link_bandwidth.get_or_create(&l).set(*bw);
                }
            }
            for (outcome, v) in [("success", s.answered), ("retried", s.retried), ("failed", s.failed)] {
                let l =
                    RequestLabels { model: s.model.clone(), variant: String::new(), outcome: outcome.into() };
                self.split_requests.get_or_create(&l).set(v as i64);
            }
        }
    }

    /// Replaces the per-node series with the cluster's nodes now (a node that left is gone).
    pub fn set_nodes(&self, nodes: &[crate::cluster::NodeStatus]) {
        let f = &self.nodes;
        f.up.clear();
        f.workers.clear();
        f.busy.clear();
        f.slowdown.clear();
        f.cpu_load.clear();
        f.mean_service.clear();
        f.failures.clear();
        f.memory_used.clear();
        f.memory_offered.clear();
        for n in nodes {
            let l = NodeLabels { node: n.name.clone() };
            f.up.get_or_create(&l).set(i64::from(n.up));
            f.workers.get_or_create(&l).set(i64::from(n.workers));
            f.busy.get_or_create(&l).set(i64::from(n.busy));
            f.slowdown.get_or_create(&l).set(n.slowdown);
            f.cpu_load.get_or_create(&l).set(n.cpu_load);
            f.mean_service.get_or_create(&l).set(n.mean_service_ms / 1e3);
            f.failures.get_or_create(&l).set(i64::from(n.recent_failures));
            f.memory_used.get_or_create(&l).set(n.memory_used_mb as i64);
            f.memory_offered.get_or_create(&l).set(n.memory_mb as i64);
        }
    }

    /// Sets each tenant's last-minute SLO attainment (`None`: no request, no sample).
    pub fn set_attainment(&self, attainment: &std::collections::BTreeMap<String, Option<f64>>) {
        self.tenant_attainment.clear();
        for (tenant, a) in attainment {
            if let Some(a) = a {
                self.tenant_attainment.get_or_create(&TenantOnlyLabels { tenant: tenant.clone() }).set(*a);
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One model's request-path series (handles into the families above).
pub struct ModelMetrics {
    pub pending: Gauge,
    pub estimator: Histogram,
    /// By variant index.
    pub variants: Vec<VariantMetrics>,
    /// By tenant index.
    pub tenants: Vec<TenantMetrics>,
}

pub struct VariantMetrics {
    pub success: Counter,
    pub batch_size: Histogram,
    pub queue: Histogram,
    pub compute_input: Histogram,
    pub compute_infer: Histogram,
    pub compute_output: Histogram,
}

pub struct TenantMetrics {
    pub met: Counter,
    pub late: Counter,
    pub accuracy: Histogram,
}
