//! Every shipped scenario runs (shortened) under every policy it lists, and the engine's
//! invariants hold: conservation, exactly-once endings, reproducibility byte for byte.

use osprey_core::config::PolicyName;
use osprey_sim::engine::{ModelContext, arrivals, simulate};
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
        .collect();
    v.sort();
    v
}

fn run(path: &std::path::Path, seconds: f64) -> (String, String, Vec<osprey_sim::engine::Summary>) {
    let (scn, base) = Scenario::load(path).unwrap();
    let scn = scn.shortened(seconds);
    let ctx = ModelContext::load(&scn, &base).unwrap();
    let arr = arrivals(&scn, &base, ctx.eval.len()).unwrap();
    let mut rows = Vec::new();
    let mut series = Vec::new();
    let mut sums = Vec::new();
    for p in &scn.policies {
        let (s, ts) = simulate(&scn, &ctx, PolicyName::parse(p).unwrap(), &arr);
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
                "{} / {}: {s:?}",
                path.display(),
                s.policy
            );
            assert_eq!(s.variants.iter().sum::<u64>(), s.completed);
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
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/multi-tenant-failure.toml");
    let (scn, base) = Scenario::load(&path).unwrap();
    let scn = scn.shortened(6.0); // xavier fails at 4 s, recovers at 5 s
    let ctx = ModelContext::load(&scn, &base).unwrap();
    let arr = arrivals(&scn, &base, ctx.eval.len()).unwrap();
    let (s, series) = simulate(&scn, &ctx, PolicyName::DataAware, &arr);
    assert!(s.retried > 0, "the failure hit work in flight: {s:?}");
    assert_eq!(s.requests, s.completed + s.rejected + s.expired + s.failed);
    // Answers keep coming after the recovery.
    assert!(series.last().unwrap().completed > 0);
}
