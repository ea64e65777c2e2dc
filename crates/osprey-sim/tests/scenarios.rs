//! Every shipped scenario runs (shortened) under every policy it lists, and the engine's
//! invariants hold: conservation, exactly-once endings, reproducibility byte for byte.

use osprey_core::config::PolicyName;
use osprey_sim::engine::{arrivals, load_models, simulate};
use osprey_sim::report::{row, summary_csv, timeseries_csv};
use osprey_sim::scenario::Scenario;
use std::path::PathBuf;

fn scenarios() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scenarios/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        // Pipeline scenarios (OPD's experiment) have their own test in osprey-learn, and
        // multi-modal ones theirs in tests/multimodal.rs.
        .filter(|p| {
            !osprey_sim::pipeline::PipelineScenario::is_pipeline_file(
                &std::fs::read_to_string(p).unwrap_or_default(),
            )
        })
        .filter(|p| Scenario::load(p).is_ok_and(|(s, _)| s.multimodal.is_empty()))
        .collect();
    v.sort();
    v
}

fn run(path: &std::path::Path, seconds: f64) -> (String, String, Vec<osprey_sim::engine::Summary>) {
    let (scn, base) = Scenario::load(path).unwrap();
    let scn = scn.shortened(seconds);
    let models = load_models(&scn, &base).unwrap();
    let arr = arrivals(&scn, &base, &models).unwrap();
    let mut rows = Vec::new();
    let mut series = Vec::new();
    let mut sums = Vec::new();
    for p in &scn.policies {
        let (s, ts) = simulate(&scn, &models, PolicyName::parse(p).unwrap(), &arr);
        rows.push(row(&s, &scn.qos));
        series.push((p.clone(), ts));
        sums.push(s);
    }
    (summary_csv(&rows), timeseries_csv(&series), sums)
}

#[test]
fn shipped_scenarios_run_conserve_requests_and_reproduce() {
    let all = scenarios();
    assert!(all.len() >= 5, "{all:?}");
    for path in &all {
        let (csv, ts, sums) = run(path, 3.0);
        for s in &sums {
            assert!(s.requests > 0, "{}: no arrivals", path.display());
            // Conservation: every arrival ended exactly once (nothing is in flight after the
            // engine drains).
            assert_eq!(
                s.requests,
                s.completed + s.rejected + s.expired + s.failed,
                "{} / {}: completed {} rejected {} expired {} failed {}",
                path.display(),
                s.policy,
                s.completed,
                s.rejected,
                s.expired,
                s.failed
            );
            assert_eq!(s.variants.iter().sum::<u64>(), s.completed);
            // The engine wakes when the dispatcher asks, no more: events stay proportional to
            // requests (stale timers once multiplied into millions of empty wake-ups).
            assert!(
                s.events <= 8 * s.requests + 1000,
                "{} / {}: {} events for {} requests",
                path.display(),
                s.policy,
                s.events,
                s.requests
            );
            assert!(s.late <= s.completed && s.correct <= s.completed);
        }
        let header = csv.lines().next().unwrap();
        assert_eq!(
            header,
            "policy,requests,completed,late_pct,rejected_pct,accuracy,utility,throughput_rps,cost,qos,p50_ms,p99_ms"
        );
        // Same seed, same bytes.
        let (csv2, ts2, _) = run(path, 3.0);
        assert_eq!(csv, csv2, "{}", path.display());
        assert_eq!(ts, ts2, "{}", path.display());
    }
}

#[test]
fn failures_retry_or_fail_explicitly_and_recovery_serves_again() {
    // One busy node fails at 1 s and recovers at 2 s; another keeps serving.
    let text = r#"
name = "failure"
seed = 5
duration_s = 3
model = "spoken_digits"
model_repository = "../../models"
policies = ["data-aware"]
[[nodes]]
name = "a"
workers = 1
[[nodes]]
name = "b"
speed = 0.5
workers = 1
[[events]]
at_s = 1.0
node = "a"
kind = "fail"
[[events]]
at_s = 2.0
node = "a"
kind = "recover"
[[tenants]]
name = "t"
latency_slo_ms = 30
[workload]
kind = "poisson"
rate = 3000
"#;
    let scn: Scenario = toml::from_str(text).unwrap();
    scn.check().unwrap();
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let models = load_models(&scn, &base).unwrap();
    let arr = arrivals(&scn, &base, &models).unwrap();
    let (s, series) = simulate(&scn, &models, PolicyName::MostAccurate, &arr);
    let brief = format!(
        "requests {} completed {} rejected {} expired {} failed {} retried {}",
        s.requests, s.completed, s.rejected, s.expired, s.failed, s.retried
    );
    assert!(s.retried + s.failed > 0, "the failure hit work in flight: {brief}");
    assert_eq!(s.requests, s.completed + s.rejected + s.expired + s.failed, "{brief}");
    // While a is down only b serves; after recovery throughput comes back.
    let during = series[1].completed;
    let after = series[2].completed;
    assert!(after > during, "{during} then {after}");
}

fn one_node(extra: &str) -> Scenario {
    let text = format!(
        r#"
name = "charges"
seed = 2
duration_s = 1
model = "digits"
model_repository = "../../models"
jitter_cv = 0.0
policies = ["data-aware"]
{extra}
[[nodes]]
name = "a"
[[tenants]]
name = "t"
latency_slo_ms = 2
[workload]
kind = "poisson"
rate = 200
"#
    );
    let scn: Scenario = toml::from_str(&text).unwrap();
    scn.check().unwrap();
    scn
}

#[test]
fn inputs_come_from_the_held_out_half_only() {
    let scn = one_node("");
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let models = load_models(&scn, &base).unwrap();
    let arr = arrivals(&scn, &base, &models).unwrap();
    assert!(arr.len() > 50);
    assert!(arr.iter().all(|a| a.sample % 2 == 1), "even samples trained the estimator");
}

#[test]
fn request_overhead_and_estimator_cost_are_charged_where_the_decision_is_made() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let run = |extra: &str| {
        let scn = one_node(extra);
        let models = load_models(&scn, &base).unwrap();
        let arr = arrivals(&scn, &base, &models).unwrap();
        simulate(&scn, &models, PolicyName::DataAware, &arr).0
    };
    let free = run("");
    assert!(free.completed > 0 && free.late == 0, "{free:?}");
    // 2.5 ms spent outside the worker cannot fit a 2 ms objective: refused at once, never
    // answered "on time" after the fact.
    let costly = run("request_overhead_us = 2500.0");
    assert_eq!(costly.completed, 0, "{costly:?}");
    assert_eq!(costly.rejected, costly.requests);
    // The estimate's time is spent before admission.
    let slow_estimate = run("estimator_us = 2500.0");
    assert_eq!(slow_estimate.completed, 0, "{slow_estimate:?}");
    assert!(run("estimator_us = 100.0").latencies_us.first() > free.latencies_us.first());
}
