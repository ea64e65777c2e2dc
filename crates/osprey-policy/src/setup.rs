//! From configuration to policy objects: the one place both drivers (the live gateway and the
//! simulator) turn a `[scheduler]` section and a model into a scheduling rule and an accuracy
//! estimator, so that a policy name means the same thing everywhere.

use crate::estimate::{AccuracyEstimator, DataAware, PerClass, Profiled};
use crate::scheduler::Rule;
use osprey_core::config::{PolicyName, SchedulerSection};
use osprey_core::model::ModelSpec;

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
