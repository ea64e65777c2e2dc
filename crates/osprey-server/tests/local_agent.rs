//! The in-process agent's execution paths, on the bundled models: short batches run on the
//! thread that dispatches them, long ones on its worker threads, the thread budget holds
//! either way, waiting batches start in order as slots free, and a stopped agent reports
//! what it still held as lost (never silently dropped).

use osprey_core::model::scan_repository;
use osprey_core::profile::VariantProfile;
use osprey_core::tensor::{DataType, RawTensor};
use osprey_policy::dispatch::{BatchId, NodeId};
use osprey_server::agent::{Agent, Completer, CompletionSink, Executed, Failure, LocalAgent, Work, WorkUnit};
use osprey_server::gateway::{Gateway, GatewayConfig, InputTensor, RequestOptions, ValidRequest};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// Records each completion: batch, thread, name of the thread, and whether it ran.
#[derive(Default)]
struct Sink {
    done: Mutex<Vec<(BatchId, ThreadId, String, bool)>>,
}

impl CompletionSink for Sink {
    fn complete(&self, _node: NodeId, batch: BatchId, result: Result<Executed, Failure>) {
        let t = std::thread::current();
        let name = t.name().unwrap_or("").to_string();
        self.done.lock().unwrap().push((batch, t.id(), name, result.is_ok()));
    }
}

impl Sink {
    fn wait_for(&self, n: usize) -> Vec<(BatchId, ThreadId, String, bool)> {
        let t = Instant::now();
        loop {
            let d = self.done.lock().unwrap().clone();
            if d.len() >= n {
                return d;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "only {} of {n} batches completed", d.len());
            std::thread::yield_now();
        }
    }
}

fn gateway() -> Arc<Gateway> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let (models, _) = scan_repository(&repo).expect("bundled models");
    let config = GatewayConfig { local_agents: Vec::new(), ..GatewayConfig::for_test(models) };
    Gateway::start(config, |_, _, _| VariantProfile::default())
}

fn request(gw: &Gateway, model: &str, variant: &str, rows: i64) -> Arc<ValidRequest> {
    let (name, dt, shape, bytes) = match model {
        "digits" => ("image", DataType::Fp32, vec![rows, 8, 8], 256 * rows as usize),
        _ => ("waveform", DataType::Int16, vec![rows, 6400], 12800 * rows as usize),
    };
    let t = RawTensor::from_bytes(dt, shape, vec![1; bytes]).unwrap();
    let inputs = vec![InputTensor { name: name.into(), tensor: t }];
    Arc::new(gw.validate(model, variant, String::new(), inputs, &[], &RequestOptions::default()).unwrap())
}

fn work(gw: &Gateway, batch: BatchId, model: &str, variant: &str, planned_us: f64) -> Work {
    // "Long" batches are 32 clips on the largest audio variant (tens of ms), so that they still
    // hold their slot when the test dispatches the next ones, even on a loaded machine.
    let rows = if planned_us >= 1e6 { 32 } else { 1 };
    let entry = gw.model(model).unwrap().clone();
    let v = entry.variant_index(variant).unwrap();
    let members = vec![request(gw, model, variant, rows)];
    Work { batch, unit: WorkUnit::Variant { model: entry, variant: v }, members, planned_us }
}

#[tokio::test]
async fn a_short_batch_runs_on_the_dispatching_thread_and_a_long_one_on_a_worker() {
    let gw = gateway();
    let sink = Arc::new(Sink::default());
    let agent = LocalAgent::start("t", 1, 1.0);
    let me = std::thread::current().id();
    agent.run(work(&gw, 1, "digits", "small", 5.0), Completer::new(sink.clone(), 0, 1));
    // Inline: completed before `run` returned, on this thread.
    let d = sink.done.lock().unwrap().clone();
    assert_eq!(d.len(), 1, "a short batch with a free slot completes inline");
    assert_eq!((d[0].0, d[0].1, d[0].3), (1, me, true));

    agent.run(work(&gw, 2, "digits", "small", 10_000.0), Completer::new(sink.clone(), 0, 2));
    let d = sink.wait_for(2);
    assert_eq!(d[1].0, 2);
    assert_ne!(d[1].1, me, "a long batch goes to a worker thread");
    assert!(d[1].2.starts_with("t-worker"), "{}", d[1].2);
    assert!(d[1].3);
    agent.stop();
}

#[tokio::test]
async fn the_thread_budget_holds_and_waiting_batches_start_in_order() {
    let gw = gateway();
    let sink = Arc::new(Sink::default());
    let agent = LocalAgent::start("t", 1, 1.0);
    let me = std::thread::current().id();
    // A long batch (several ms) takes the only slot on the worker thread...
    agent.run(work(&gw, 0, "spoken_digits", "large", 1e6), Completer::new(sink.clone(), 0, 0));
    // ...so short batches dispatched meanwhile wait instead of running here.
    for b in 1..=20 {
        agent.run(work(&gw, b, "digits", "small", 5.0), Completer::new(sink.clone(), 0, b));
    }
    let d = sink.wait_for(21);
    let order: Vec<BatchId> = d.iter().map(|x| x.0).collect();
    assert_eq!(order, (0..=20).collect::<Vec<_>>(), "one slot: batches complete in dispatch order");
    assert!(d.iter().all(|x| x.3), "every batch ran");
    assert!(d.iter().all(|x| x.1 != me), "no batch ran beside the one holding the slot");
    agent.stop();
}

#[test]
fn without_a_runtime_short_batches_still_run_and_a_stopped_agent_reports_what_it_held() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gw = rt.block_on(async { gateway() });
    let sink = Arc::new(Sink::default());
    // Started outside any runtime: short batches it cannot run inline go to its workers.
    let agent = LocalAgent::start("t", 1, 1.0);
    agent.run(work(&gw, 0, "spoken_digits", "large", 1e6), Completer::new(sink.clone(), 0, 0));
    for b in 1..=5 {
        agent.run(work(&gw, b, "digits", "small", 5.0), Completer::new(sink.clone(), 0, b));
    }
    assert_eq!(sink.wait_for(6).len(), 6);
    // Stopped with batches waiting: each is reported (lost), none vanishes.
    agent.run(work(&gw, 10, "spoken_digits", "large", 1e6), Completer::new(sink.clone(), 0, 10));
    for b in 11..=15 {
        agent.run(work(&gw, b, "digits", "small", 5.0), Completer::new(sink.clone(), 0, b));
    }
    agent.stop();
    let d = sink.wait_for(12);
    assert_eq!(d.len(), 12, "every batch completed exactly once");
    let mut ids: Vec<BatchId> = d[6..].iter().map(|x| x.0).collect();
    ids.sort();
    assert_eq!(ids, vec![10, 11, 12, 13, 14, 15]);
    agent.run(work(&gw, 20, "digits", "small", 5.0), Completer::new(sink.clone(), 0, 20));
    let d = sink.wait_for(13);
    assert_eq!((d[12].0, d[12].3), (20, false), "a stopped agent refuses new batches as lost");
}

#[tokio::test]
async fn a_free_slot_runs_a_medium_batch_here_even_beside_a_long_one() {
    let gw = gateway();
    let sink = Arc::new(Sink::default());
    let agent = LocalAgent::start("t", 2, 1.0);
    let me = std::thread::current().id();
    // A long batch on one worker thread...
    agent.run(work(&gw, 1, "spoken_digits", "large", 1e6), Completer::new(sink.clone(), 0, 1));
    // ...and a 200 µs batch takes the other slot, on this thread, completing before `run` returns.
    agent.run(work(&gw, 2, "digits", "small", 200.0), Completer::new(sink.clone(), 0, 2));
    let d = sink.done.lock().unwrap().clone();
    let second = d.iter().find(|x| x.0 == 2).expect("batch 2 completed inline");
    assert_eq!(second.1, me);
    let d = sink.wait_for(2);
    assert!(d.iter().all(|x| x.3));
    let first = d.iter().find(|x| x.0 == 1).expect("batch 1 completed");
    assert!(first.2.starts_with("t-worker"), "{}", first.2);
    agent.stop();
}
