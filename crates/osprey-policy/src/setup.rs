//! From configuration to policy objects: the one place both drivers (the live gateway and the
//! simulator) turn a `[scheduler]` section and a model into a scheduling rule and an accuracy
//! estimator, so that a policy name means the same thing everywhere.

use crate::estimate::{AccuracyEstimator, DataAware, PerClass, Profiled};
use crate::scheduler::{Rule, Scheduler, SchedulerConfig, VariantModel};
use osprey_core::config::{PolicyName, SchedulerSection};
use osprey_core::model::ModelSpec;
use osprey_core::profile::{Quantile, VariantProfile};

/// Planning quantile: schedulers plan with p99 service time (p90 left ~2% late answers under
/// overload in `bench/scheduling.sh`).
pub const PLAN_QUANTILE: Quantile = Quantile::P99;

/// What a driver knows beyond the policy section when it builds a model's scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Largest batch the server allows (the model's own `max_batch_size` also bounds it).
    pub max_batch: u32,
    /// Requests one model's queue may hold.
    pub max_queue: usize,
    /// Worker threads that serve the model at start (the dispatcher updates it as nodes come
    /// and go).
    pub workers: u32,
}

/// The one constructor of a model's scheduler, used by the live gateway and the simulator:
/// the rule from the policy name, the batch bound, the planning quantile and the variants'
/// profiles (`profiles[i]` belongs to `spec.variants[i]`).
pub fn scheduler_for(
    section: &SchedulerSection,
    spec: &ModelSpec,
    profiles: Vec<VariantProfile>,
    cap: Capacity,
    tenant_weights: &[f64],
) -> Scheduler {
    let cfg = SchedulerConfig {
        rule: rule_for(section, spec),
        max_rows: cap.max_batch.min(spec.max_batch_size).max(1),
        max_queue: cap.max_queue,
        quantile: PLAN_QUANTILE,
        urgency_weight: section.urgency_weight,
        miss_penalty: section.miss_penalty,
        workers: cap.workers.max(1),
        tenant_queue: crate::scheduler::tenant_queue_bounds(cap.max_queue, tenant_weights),
    };
    let variants = spec
        .variants
        .iter()
        .zip(profiles)
        .map(|(v, profile)| VariantModel { accuracy: v.accuracy, swap_us: profile.swap_us, profile })
        .collect();
    Scheduler::new(cfg, variants)
}

/// The scheduling rule a policy runs for one model.
pub fn rule_for(section: &SchedulerSection, spec: &ModelSpec) -> Rule {
    let fixed = || {
        section
            .fixed_variant
            .as_ref()
            .and_then(|n| spec.variants.iter().position(|v| &v.name == n))
            .unwrap_or(spec.variants.len() / 2)
    };
    match section.policy {
        PolicyName::DataAware | PolicyName::Profiled | PolicyName::PerClass => Rule::Utility,
        PolicyName::MostAccurate => Rule::MostAccurate,
        PolicyName::Fastest => Rule::Fastest,
        PolicyName::Fixed => Rule::Fixed(fixed()),
        PolicyName::Edf => Rule::Edf(fixed()),
        PolicyName::Llf => Rule::Llf,
        PolicyName::Dream => Rule::Dream,
        PolicyName::Random => Rule::Random(0x5eed),
        PolicyName::Greedy => Rule::Greedy,
    }
}

/// The estimator a policy uses for one model. `data_aware` is the model's trained estimator,
/// if the driver found one; without it the data-aware policy falls back to profiled accuracy
/// (the returned flag says so).
pub fn estimator_for(
    policy: PolicyName,
    spec: &ModelSpec,
    data_aware: Option<DataAware>,
) -> (Box<dyn AccuracyEstimator>, bool) {
    let profiled = || Box::new(Profiled { accuracy: spec.variants.iter().map(|v| v.accuracy).collect() });
    match policy {
        PolicyName::DataAware => match data_aware {
            Some(m) if m.variants.iter().eq(spec.variants.iter().map(|v| &v.name)) => (Box::new(m), false),
            _ => (profiled(), true),
        },
        PolicyName::PerClass if spec.variants.iter().all(|v| v.class_accuracy.len() == spec.labels.len()) => {
            (
                Box::new(PerClass::new(
                    spec.variants.iter().map(|v| v.class_accuracy.clone()).collect(),
                    200.0,
                )),
                false,
            )
        }
        _ => (profiled(), false),
    }
}
