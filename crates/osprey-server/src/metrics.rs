//! Prometheus metrics, Triton-like: requests by model, variant and outcome; queue and compute
//! (input, infer, output) durations; pending requests; batch sizes; per tenant: outcomes (SLO
//! attainment = met / all), estimated accuracy of answers; estimator and decision time.

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
pub struct TenantModelLabels {
    pub tenant: String,
    pub model: String,
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
    registry: Registry,
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
        Metrics {
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
            registry,
        }
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

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
