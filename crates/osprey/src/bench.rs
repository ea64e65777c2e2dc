//! `osprey bench SCENARIO --out DIR`: a pipeline scenario (one naming a `pipeline`) goes to
//! [`crate::pipebench`]; any other runs every policy of a scenario on the same arrivals in
//! the simulator, with a progress bar; prints a table; writes `DIR/summary.csv`,
//! `DIR/timeseries.csv` and SVG plots (time series of late %, accuracy and cost; summary bars
//! of utility and QoS). The same scenario and seed give byte-identical files. A multi-modal
//! scenario (`multimodal = ...`) runs its policies on paired events
//! ([`osprey_sim::multimodal`]) and also writes `DIR/multimodal.csv` (per tenant: accuracy,
//! late %, refinement rate, calls per request, explanation share, goodput and its share of
//! the oracle's).

use crate::plot;
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use osprey_core::config::PolicyName;
use osprey_sim::engine::{arrivals, load_models, selector, simulate_with};
use osprey_sim::report::{row, summary_csv, timeseries_csv};
use osprey_sim::scenario::Scenario;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Scenario file (TOML), e.g. scenarios/accuracy-scaling.toml.
    scenario: PathBuf,
    /// Output folder for summary.csv, timeseries.csv and the plots.
    #[arg(long)]
    out: PathBuf,
    /// Override the scenario's duration, seconds (timed events scale with it).
    #[arg(long)]
    duration: Option<f64>,
    /// Only these policies (comma-separated).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    let text =
        std::fs::read_to_string(&args.scenario).map_err(|e| format!("{}: {e}", args.scenario.display()))?;
    if osprey_sim::pipeline::PipelineScenario::is_pipeline_file(&text) {
        return crate::pipebench::run_bench(&args.scenario, &args.out, args.duration, &args.policies);
    }
    let (mut scn, base) = Scenario::load(&args.scenario)?;
    if let Some(d) = args.duration {
        if d.is_nan() || d <= 0.0 {
            return Err("--duration must be positive".into());
        }
        scn = scn.shortened(d);
    }
    if !args.policies.is_empty() {
        scn.policies = args.policies.clone();
        scn.check()?;
    }
    if !scn.multimodal.is_empty() {
        return run_multimodal(&scn, &base, &args.out);
    }
    let models = load_models(&scn, &base)?;
    let arr = arrivals(&scn, &base, &models)?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let runs: Vec<(String, String)> =
        scn.policies.iter().flat_map(|p| scn.selectors.iter().map(move |s| (p.clone(), s.clone()))).collect();
    let bar = ProgressBar::new(runs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:28} [{bar:30}] {pos}/{len} runs")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut rows = Vec::new();
    let mut series = Vec::new();
    let mut events = 0u64;
    let started = Instant::now();
    for (name, sel) in &runs {
        let label = if scn.selectors.len() > 1 { format!("{name}/{sel}") } else { name.clone() };
        bar.set_message(label.clone());
        let policy = PolicyName::parse(name).ok_or_else(|| format!("unknown policy '{name}'"))?;
        let selector = selector(sel).ok_or_else(|| format!("unknown selector '{sel}'"))?;
        let (mut summary, s) = simulate_with(&scn, &models, policy, selector, &arr);
        summary.policy = label.clone();
        events += summary.events;
        rows.push(row(&summary, &scn.qos));
        series.push((label, s));
        bar.inc(1);
    }
    let wall = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let counts = Counts { arrivals: arr.len(), events, wall };
    write_outputs(&scn, &args.out, &rows, &series, &counts, &[])?;
    println!("wrote summary.csv, timeseries.csv, report.html and plots (SVG, PNG) to {}", args.out.display());
    Ok(())
}

/// How much one bench run simulated, and how long it took.
#[derive(Clone, Copy)]
struct Counts {
    arrivals: usize,
    events: u64,
    wall: f64,
}

/// Prints the summary table and writes summary.csv, timeseries.csv, the plots and the report
/// (with `extra`, plots drawn beside it already, after its own).
fn write_outputs(
    scn: &Scenario,
    out: &std::path::Path,
    rows: &[osprey_sim::report::Row],
    series: &[(String, Vec<osprey_sim::engine::Interval>)],
    counts: &Counts,
    extra: &[&str],
) -> Result<(), String> {
    let Counts { arrivals, events, wall } = *counts;
    let mut table = Table::new();
    table.set_header([
        "policy",
        "requests",
        "completed",
        "late %",
        "rejected %",
        "accuracy",
        "utility",
        "on-time rps",
        "cost",
        "QoS",
        "p50 ms",
        "p99 ms",
    ]);
    for r in rows {
        table.add_row([
            r.policy.clone(),
            r.requests.to_string(),
            r.completed.to_string(),
            format!("{:.2}", r.late_pct),
            format!("{:.2}", r.rejected_pct),
            format!("{:.4}", r.accuracy),
            format!("{:.4}", r.utility),
            format!("{:.1}", r.throughput_rps),
            format!("{:.2}", r.cost),
            format!("{:.4}", r.qos),
            format!("{:.2}", r.p50_ms),
            format!("{:.2}", r.p99_ms),
        ]);
    }
    println!(
        "scenario {} ({} s simulated, {} arrivals, seed {}; inputs: {})",
        scn.name,
        scn.duration_s,
        arrivals,
        scn.seed,
        osprey_core::model::EvalSet::HELD_OUT
    );
    println!("{table}");
    println!("simulated {events} events in {wall:.2} s: {:.0} events/s", events as f64 / wall.max(1e-9));
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    write("summary.csv", summary_csv(rows))?;
    write("timeseries.csv", timeseries_csv(series))?;
    let line = |f: &dyn Fn(&osprey_sim::engine::Interval) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        series.iter().map(|(p, s)| (p.clone(), s.iter().map(|i| (i.t_s, f(i))).collect())).collect()
    };
    let late = |i: &osprey_sim::engine::Interval| {
        if i.arrivals > 0 { 100.0 * i.not_on_time as f64 / i.arrivals as f64 } else { 0.0 }
    };
    let acc = |i: &osprey_sim::engine::Interval| {
        if i.completed > 0 { i.correct as f64 / i.completed as f64 } else { 0.0 }
    };
    plot::lines(&out.join("late_pct"), &format!("{}: late %", scn.name), "late %", &line(&late))?;
    plot::lines(&out.join("accuracy"), &format!("{}: accuracy", scn.name), "accuracy", &line(&acc))?;
    plot::lines(&out.join("cost"), &format!("{}: cost per interval", scn.name), "cost", &line(&|i| i.cost))?;
    let bars = |f: &dyn Fn(&osprey_sim::report::Row) -> f64| {
        rows.iter().map(|r| (r.policy.clone(), f(r))).collect::<Vec<_>>()
    };
    plot::bars(&out.join("utility"), &format!("{}: utility per request", scn.name), &bars(&|r| r.utility))?;
    plot::bars(&out.join("qos"), &format!("{}: QoS (OPD eq. 3)", scn.name), &bars(&|r| r.qos))?;
    plot::report(
        out,
        &format!("Osprey bench: {}", scn.name),
        &[format!(
            "simulated {:.0} s, {} arrivals, seed {}; late % counts answers not on time among all requests; accuracy among answered",
            scn.duration_s, arrivals, scn.seed
        )],
        &summary_csv(rows),
        &[&["late_pct", "accuracy", "cost", "utility", "qos"], extra].concat(),
    )?;
    Ok(())
}

/// A multi-modal scenario: every policy on the same paired events, side by side.
fn run_multimodal(scn: &Scenario, base: &std::path::Path, out: &std::path::Path) -> Result<(), String> {
    use osprey_core::multimodal::MultiModalPolicy;
    use osprey_sim::multimodal::{MmContext, arrivals, simulate, tenants_csv};
    let ctx = MmContext::load(scn, base)?;
    let arr = arrivals(scn, base, &ctx)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let bar = ProgressBar::new(scn.policies.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:28} [{bar:30}] {pos}/{len} runs")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut runs = Vec::new();
    for name in &scn.policies {
        bar.set_message(name.clone());
        let policy =
            MultiModalPolicy::parse(name).ok_or_else(|| format!("unknown multi-modal policy '{name}'"))?;
        runs.push((name.clone(), simulate(scn, &ctx, policy, &arr)));
        bar.inc(1);
    }
    let wall = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let rows: Vec<_> = runs.iter().map(|(_, r)| row(&r.summary, &scn.qos)).collect();
    let series: Vec<_> = runs.iter().map(|(p, r)| (p.clone(), r.series.clone())).collect();
    let events = runs.iter().map(|(_, r)| r.summary.events).sum();
    let oracle = runs
        .iter()
        .find(|(p, _)| p == "oracle")
        .and_then(|(_, r)| r.tenants.last())
        .map(|t| t.on_time_correct);
    let refs: Vec<(String, &osprey_sim::multimodal::MmRun)> =
        runs.iter().map(|(p, r)| (p.clone(), r)).collect();
    let per_tenant = tenants_csv(&refs, scn, oracle);
    let mut table = Table::new();
    table.set_header([
        "policy",
        "tenant",
        "accuracy",
        "late %",
        "refined %",
        "calls/request",
        "explained %",
        "goodput of oracle",
    ]);
    for line in per_tenant.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if let [policy, tenant, _, acc, late, refined, calls, explained, _, of] = f.as_slice() {
            table.add_row([*policy, *tenant, *acc, *late, *refined, *calls, *explained, *of]);
        }
    }
    let extra = multimodal_plots(out, &per_tenant)?;
    let counts = Counts { arrivals: arr.len(), events, wall };
    write_outputs(scn, out, &rows, &series, &counts, &extra)?;
    println!("{table}");
    let p = out.join("multimodal.csv");
    std::fs::write(&p, per_tenant).map_err(|e| format!("{}: {e}", p.display()))?;
    println!(
        "wrote summary.csv, multimodal.csv, timeseries.csv, report.html and plots (SVG, PNG) to {}",
        out.display()
    );
    Ok(())
}

/// The multi-modal charts of a per-tenant table (`multimodal.csv`, as the simulator and
/// `bench/multimodal.sh` write it): accuracy, not-on-time %, refinement rate and explanation
/// share, policies side by side, one bar per tenant (and `all`). Returns the plots' stems.
pub fn multimodal_plots(out: &std::path::Path, csv: &str) -> Result<Vec<&'static str>, String> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or("multimodal.csv is empty")?.split(',').collect();
    let col = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| format!("multimodal.csv has no column '{name}'"))
    };
    let (policy, tenant) = (col("policy")?, col("tenant")?);
    let charts = [
        ("mm_accuracy", "accuracy", "accuracy (answered)"),
        ("mm_late_pct", "late_pct", "not on time %"),
        ("mm_refined_pct", "refined_pct", "refined %"),
        ("mm_explained_pct", "explained_pct", "explained %"),
    ];
    let columns = charts.iter().map(|(_, c, _)| col(c)).collect::<Result<Vec<_>, _>>()?;
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let mut policies: Vec<String> = Vec::new();
    let mut tenants: Vec<String> = Vec::new();
    for r in &rows {
        let (Some(p), Some(t)) = (r.get(policy), r.get(tenant)) else {
            return Err(format!("multimodal.csv: a row has fewer columns than its header: {}", r.join(",")));
        };
        if !policies.iter().any(|x| x == p) {
            policies.push(p.to_string());
        }
        if !tenants.iter().any(|x| x == t) {
            tenants.push(t.to_string());
        }
    }
    for ((stem, _, label), &c) in charts.iter().zip(&columns) {
        let series: Vec<(String, Vec<f64>)> = tenants
            .iter()
            .map(|t| {
                let values = policies
                    .iter()
                    .map(|p| {
                        rows.iter()
                            .find(|r| r[policy] == p && r[tenant] == t)
                            .and_then(|r| r.get(c)?.parse::<f64>().ok())
                            .unwrap_or(f64::NAN)
                    })
                    .collect();
                (t.clone(), values)
            })
            .collect();
        plot::grouped_bars(
            &out.join(stem),
            &format!("{label} per policy and tenant"),
            label,
            &policies,
            &series,
        )?;
    }
    Ok(charts.iter().map(|(stem, _, _)| *stem).collect())
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// A folder holding a multi-modal run's `multimodal.csv` (and its `summary.csv`), such as
    /// bench/multimodal/live after `bench/multimodal.sh`.
    dir: PathBuf,
    /// The report's title.
    #[arg(long, default_value = "Osprey multi-modal run")]
    title: String,
}

/// `osprey report DIR`: the charts of [`multimodal_plots`] and `report.html` for a run whose
/// CSVs were written elsewhere (the live benchmark), beside them.
pub fn report(args: ReportArgs) -> Result<(), String> {
    let read = |name: &str| {
        let p = args.dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let per_tenant = read("multimodal.csv")?;
    let summary = read("summary.csv").unwrap_or_else(|_| per_tenant.clone());
    let plots = multimodal_plots(&args.dir, &per_tenant)?;
    let notes = ["late % counts answers not on time among all requests; accuracy among answered".to_string()];
    plot::report(&args.dir, &args.title, &notes, &summary, &plots)?;
    println!("wrote report.html and {} plots (SVG, PNG) to {}", plots.len(), args.dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multimodal_charts_from_either_table() {
        let dir = std::env::temp_dir().join(format!("osprey-mmplots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = "policy,tenant,requests,accuracy,late_pct,refined_pct,calls_per_request,explained_pct\n\
                   quality-driven,safety,10,0.95,0.5,60,1.7,0\nquality-driven,all,20,0.93,0.2,65,2.3,50\n\
                   edf,safety,10,0.90,0,100,2,0\nedf,all,20,0.89,0,100,2,40\n";
        let stems = multimodal_plots(&dir, csv).unwrap();
        assert_eq!(stems, ["mm_accuracy", "mm_late_pct", "mm_refined_pct", "mm_explained_pct"]);
        let svg = std::fs::read_to_string(dir.join("mm_refined_pct.svg")).unwrap();
        assert!(
            svg.contains("quality-driven") && svg.contains("safety") && svg.contains("refined %"),
            "{svg}"
        );
        let err = multimodal_plots(&dir, "policy,tenant,accuracy\nedf,all,0.9\n").unwrap_err();
        assert!(err.contains("late_pct"), "{err}");
        let missing = report(ReportArgs { dir: dir.join("none"), title: "t".into() }).unwrap_err();
        assert!(missing.contains("multimodal.csv"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
