//! The shipped multi-modal scenario runs (shortened) under every policy it lists: every event
//! ends exactly once, per-tenant totals add up, the objectives bound the calls, the same seed
//! gives the same bytes, and the hindsight oracle bounds goodput.

use osprey_core::multimodal::MultiModalPolicy;
use osprey_sim::multimodal::{MmContext, MmRun, arrivals, simulate, tenants_csv};
use osprey_sim::report::{row, summary_csv};
use osprey_sim::scenario::Scenario;
use std::path::PathBuf;

fn scenario() -> (Scenario, PathBuf) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/multimodal.toml");
    let (scn, base) = Scenario::load(&path).unwrap();
    (scn.shortened(4.0), base)
}

fn run_all(scn: &Scenario, base: &std::path::Path) -> Vec<(String, MmRun)> {
    let ctx = MmContext::load(scn, base).unwrap();
    let arr = arrivals(scn, base, &ctx).unwrap();
    assert!(arr.len() > 100, "{}", arr.len());
    scn.policies
        .iter()
        .map(|p| (p.clone(), simulate(scn, &ctx, MultiModalPolicy::parse(p).unwrap(), &arr)))
        .collect()
}

#[test]
fn every_event_ends_once_and_the_objectives_bound_the_calls() {
    let (scn, base) = scenario();
    let runs = run_all(&scn, &base);
    assert_eq!(runs.len(), 8, "every policy of the issue");
    for (p, r) in &runs {
        let s = &r.summary;
        assert_eq!(s.requests, s.completed + s.rejected + s.expired + s.failed, "{p}: {s:?}");
        assert!(s.late <= s.completed && s.correct <= s.completed, "{p}");
        let all = r.tenants.last().unwrap();
        assert_eq!(all.requests, s.requests, "{p}");
        assert_eq!(all.completed, s.completed, "{p}");
        let sum = |f: fn(&osprey_sim::multimodal::TenantTotals) -> u64| {
            r.tenants[..r.tenants.len() - 1].iter().map(f).sum::<u64>()
        };
        assert_eq!(sum(|t| t.requests), all.requests, "{p}");
        assert_eq!(sum(|t| t.calls), all.calls, "{p}");
        // Calls per event: one for the single-answer policies, at most the ensemble size.
        for (t, tt) in r.tenants[..r.tenants.len() - 1].iter().enumerate() {
            let cap = match p.as_str() {
                "quality-driven" => scn.tenants[t].quality.as_ref().map_or(2, |q| q.max_ensemble),
                "fixed-ensemble" | "edf" | "llf" | "dream" => 2,
                _ => 1,
            } as u64;
            assert!(
                tt.calls <= cap * tt.requests,
                "{p} / {}: {} calls for {}",
                scn.tenants[t].name,
                tt.calls,
                tt.requests
            );
            if cap == 1 {
                assert_eq!(tt.refined, 0, "{p}");
            }
        }
    }
    let by = |name: &str| &runs.iter().find(|(p, _)| p == name).unwrap().1;
    // The camera tenant carries the image only: no parallel policy calls twice for it.
    let camera = scn.tenants.iter().position(|t| t.name == "camera").unwrap();
    let fixed = &by("fixed-ensemble").tenants[camera];
    assert!(fixed.calls <= fixed.requests);
    // Refinement happens for someone under the quality-driven policy, never without it.
    assert!(by("quality-driven").tenants.last().unwrap().refined > 0);
    assert_eq!(by("no-refinement").tenants.last().unwrap().refined, 0);
    // The oracle knows which answers are right: nobody has more right answers on time.
    let goodput = |r: &MmRun| r.tenants.last().unwrap().on_time_correct;
    let oracle = goodput(by("oracle"));
    for (p, r) in &runs {
        assert!(goodput(r) <= oracle + oracle / 50, "{p}: {} right on time, the oracle {oracle}", goodput(r));
    }
}

#[test]
fn same_seed_same_bytes() {
    let (scn, base) = scenario();
    let csv = |runs: &[(String, MmRun)]| {
        let rows: Vec<_> = runs.iter().map(|(_, r)| row(&r.summary, &scn.qos)).collect();
        let refs: Vec<(String, &MmRun)> = runs.iter().map(|(p, r)| (p.clone(), r)).collect();
        (summary_csv(&rows), tenants_csv(&refs, &scn, None))
    };
    let a = csv(&run_all(&scn, &base));
    let b = csv(&run_all(&scn, &base));
    assert_eq!(a, b);
    for p in ["quality-driven", "dream", "llf", "edf", "profiled", "fixed-ensemble", "no-refinement"] {
        assert!(a.0.lines().any(|l| l.starts_with(&format!("{p},"))), "{p} row in summary.csv");
    }
}

#[test]
fn bad_multimodal_scenarios_say_what_is_wrong() {
    let (scn, _) = scenario();
    let mut bad = scn.clone();
    bad.policies = vec!["data-aware".into()];
    assert!(bad.check().unwrap_err().contains("multi-modal policy"));
    let mut bad = scn.clone();
    bad.model = "digits".into();
    assert!(bad.check().unwrap_err().contains("drop `model`"));
    let mut bad = scn;
    bad.tenants[0].quality.as_mut().unwrap().max_ensemble = 0;
    assert!(bad.check().unwrap_err().contains("max_ensemble"));
}
