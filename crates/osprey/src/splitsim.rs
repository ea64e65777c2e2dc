//! `osprey split-sim`: split inference of a 32-layer model over eight edge nodes in the
//! simulator (`osprey_sim::split`), every placement strategy side by side, then the planner's
//! re-split after one node slows down three times.

use osprey_policy::split::{Objective, Strategy, plan};
use osprey_sim::split::{SplitScenario, predicted_ms, run};

#[derive(clap::Args)]
pub struct SplitSimArgs {
    /// Poisson arrivals per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Simulated seconds of load.
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    /// When the busiest node slows down (seconds into the run).
    #[arg(long, default_value_t = 30.0)]
    slow_at: f64,
    /// Seconds to load one unit's weights when a plan changes.
    #[arg(long, default_value_t = 0.3)]
    load_s_per_unit: f64,
    /// Minimise the slowest stage (pipelined throughput) instead of latency.
    #[arg(long)]
    throughput: bool,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

pub fn run_split_sim(a: SplitSimArgs) -> Result<(), String> {
    if !(a.rate > 0.0 && a.duration > 0.0 && a.load_s_per_unit >= 0.0) {
        return Err("--rate and --duration must be positive, --load-s-per-unit not negative".into());
    }
    let objective = if a.throughput { Objective::Throughput } else { Objective::Latency };
    let mut sc = SplitScenario::edge_site();
    sc.rate = a.rate;
    sc.duration_s = a.duration;
    sc.load_s_per_unit = a.load_s_per_unit;
    sc.seed = a.seed;
    println!(
        "{} nodes, {} units (embedding + 32 layers), units 0..{} pinned to trusted nodes; {} req/s for {} s",
        sc.nodes.len(),
        sc.unit_us.len(),
        sc.private_units,
        a.rate,
        a.duration
    );
    println!();
    println!("| strategy | p50 ms | p99 ms | throughput/s | predicted ms | lost | plan |");
    println!("|---|---|---|---|---|---|---|");
    for s in Strategy::ALL {
        match run(&sc, s, objective) {
            Some(r) => println!(
                "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {} | {} |",
                r.strategy,
                r.p50_ms,
                r.p99_ms,
                r.throughput,
                predicted_ms(&sc, s, objective).unwrap_or(f64::NAN),
                r.lost,
                r.plan
            ),
            None => println!(
                "| {} | - | - | - | - | - | infeasible (no placement fits memory and privacy) |",
                s.name()
            ),
        }
    }
    // The planner's plan; slow its busiest node three times.
    let first = plan(&sc.problem(objective), Strategy::Planner).ok_or("the planner found no plan")?;
    let busiest = first.stages.iter().max_by_key(|s| s.units.len()).map_or(0, |s| s.node);
    sc.slowdown = Some((busiest, a.slow_at, 3.0));
    println!();
    println!("{} slows down 3x at {} s:", sc.nodes[busiest].name, a.slow_at);
    println!();
    println!("| strategy | p50 ms | p99 ms | re-split s | plans | lost |");
    println!("|---|---|---|---|---|---|");
    for s in Strategy::ALL {
        if let Some(r) = run(&sc, s, objective) {
            println!(
                "| {} | {:.0} | {:.0} | {} | {} | {} |",
                r.strategy,
                r.p50_ms,
                r.p99_ms,
                r.resplit_s.map_or("-".into(), |x| format!("{x:.1}")),
                r.plans,
                r.lost
            );
        }
    }
    Ok(())
}
