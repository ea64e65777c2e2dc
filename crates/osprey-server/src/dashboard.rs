//! The live web dashboard: one page compiled into the binary (no CDN, no files to install),
//! served at `/dashboard`, and the JSON it polls every second at `/v2/dashboard/data`.
//!
//! The page shows nodes and their health, models and their queues, each tenant's SLO
//! attainment and estimated accuracy per second, the variant mix per second, the control
//! loop's pipeline configurations and the split plans. Both routes need the admin role once
//! keys are configured; a browser gets HTTP Basic's prompt (any name, the key as password).

use crate::gateway::Gateway;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Instant;

/// The page (HTML, CSS and script in one file).
pub const PAGE: &str = include_str!("../assets/dashboard.html");

/// What the page draws: the state now and the per-second series of [`crate::timeline`].
pub fn data(gw: &Gateway) -> Value {
    let nodes = gw.cluster.status();
    let mut replicas: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
    // model -> node -> variants loaded there.
    let mut hosted: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for n in &nodes {
        for (m, q) in &n.replicas {
            replicas.entry(m.as_str()).or_default().insert(n.name.as_str(), *q);
        }
        for i in &n.instances {
            if let Some((m, v)) = i.split_once('/') {
                hosted.entry(m).or_default().entry(n.name.as_str()).or_default().push(v);
            }
        }
    }
    let models: Vec<Value> = gw
        .models()
        .iter()
        .map(|m| {
            json!({
                "name": m.name(),
                "pending": m.metrics.pending.get(),
                "replicas": replicas.get(m.name()).cloned().unwrap_or_default(),
                "hosted": hosted.get(m.name()).cloned().unwrap_or_default(),
                "configuration": gw.configuration(m.name()),
            })
        })
        .collect();
    let pipelines: Vec<Value> = gw
        .pipelines()
        .map(|p| {
            let stages: Vec<Value> =
                p.spec.stages.iter().map(|s| json!({ "stage": s.name, "model": s.model })).collect();
            json!({ "name": p.spec.name, "stages": stages, "configuration": gw.configuration(&p.spec.name) })
        })
        .collect();
    let splits: Vec<_> = gw.splits().map(|d| d.status()).collect();
    json!({
        "server": {
            "name": crate::SERVER_NAME,
            "version": crate::SERVER_VERSION,
            "policy": gw.policy.as_str(),
            "uptime_s": gw.uptime_s(),
        },
        "nodes": nodes,
        "models": models,
        "pipelines": pipelines,
        "splits": splits,
        "series": gw.timeline.series(Instant::now()),
    })
}
