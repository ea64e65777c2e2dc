//! The seam between the live dispatcher and whatever runs a batch: the [`Agent`] trait, the
//! unit of work it receives, and the [`Completer`] through which it reports back.
//!
//! Three implementations: [`LocalAgent`] (in-process worker threads, the embedded default),
//! `cluster::RemoteAgent` (an `osprey agent` process over `osprey.agent.v1`), and
//! [`FakeAgent`] (holds batches until a test completes them).
//!
//! A [`Work`] item names its unit: a whole variant today; a pipeline stage or a layer range of
//! a split model are the same item with another [`WorkUnit`], so adding them changes agents, not
//! the dispatcher. Agents never see tenants or deadlines: the dispatcher owns those.
//!
//! The [`Completer`] is a drop guard: an agent that loses a batch without completing it (a
//! worker that stopped, a channel that closed) reports it lost when the completer is dropped,
//! and the dispatcher fails it over. No batch can vanish silently.

use crate::gateway::{ModelEntry, ValidRequest};
use osprey_core::error::{Error, Result};
use osprey_core::tensor::RawTensor;
use osprey_engine::batch;
use osprey_policy::dispatch::{BatchId, NodeId};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a batch runs.
#[derive(Debug, Clone)]
pub enum WorkUnit {
    /// One variant of a model, inputs to outputs.
    Variant { model: Arc<ModelEntry>, variant: usize },
    /// Layers `[start, end)` of a model split across nodes: inputs are the previous range's
    /// activations. No agent runs these yet.
    Layers { model: Arc<ModelEntry>, variant: usize, layers: Range<u32> },
}

impl WorkUnit {
    pub fn model(&self) -> &Arc<ModelEntry> {
        match self {
            WorkUnit::Variant { model, .. } | WorkUnit::Layers { model, .. } => model,
        }
    }
}

/// One batch for an agent.
#[derive(Debug, Clone)]
pub struct Work {
    pub batch: BatchId,
    pub unit: WorkUnit,
    /// The members' validated requests, in batch order.
    pub members: Vec<Arc<ValidRequest>>,
    /// The dispatcher's planned service time, µs (in-process agents run short batches inline).
    pub planned_us: f64,
}

/// What an agent returns for a batch that ran.
#[derive(Debug)]
pub struct Executed {
    /// Outputs per member, in the model's declared output order.
    pub outputs: Vec<Vec<RawTensor>>,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
    /// Time the node spent on the batch (its own clock), µs.
    pub service_us: f64,
    /// The engine's part of it (what profiles measure), µs.
    pub engine_us: f64,
}

/// How a batch failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// It ran and the engine failed: the members get this error.
    Engine(Error),
    /// The agent could not run or finish it: fail over.
    Lost(String),
}

/// Where completions go (the live cluster; tests may use their own).
pub trait CompletionSink: Send + Sync {
    fn complete(&self, node: NodeId, batch: BatchId, result: std::result::Result<Executed, Failure>);
}

/// Reports one batch's end exactly once; dropped unused, it reports the batch lost.
pub struct Completer {
    sink: Arc<dyn CompletionSink>,
    node: NodeId,
    batch: BatchId,
    done: bool,
}

impl Completer {
    pub fn new(sink: Arc<dyn CompletionSink>, node: NodeId, batch: BatchId) -> Completer {
        Completer { sink, node, batch, done: false }
    }

    pub fn complete(mut self, result: std::result::Result<Executed, Failure>) {
        self.done = true;
        self.sink.complete(self.node, self.batch, result);
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if !self.done {
            self.sink.complete(
                self.node,
                self.batch,
                Err(Failure::Lost("the agent dropped the batch".into())),
            );
        }
    }
}

/// A node that runs batches.
pub trait Agent: Send + Sync {
    fn name(&self) -> &str;
    /// Starts `work`; never blocks. The outcome goes to `done`.
    fn run(&self, work: Work, done: Completer);
    /// Loads a variant; the answer comes back as a `Loaded` event (remote agents).
    fn load(&self, _model: &str, _variant: &str) {}
    fn unload(&self, _model: &str, _variant: &str) {}
    /// The node left the pool: close its connection so that it can join anew.
    fn disconnect(&self, _reason: &str) {}
    /// Stops after the batches already started.
    fn stop(&self) {}
}

/// Batches planned to take at most this long (µs) run on a runtime thread — the request's own
/// connection task when a slot is free at its arrival — instead of being handed to a worker
/// thread: for small models the hand-off (a futex wake and two context switches) costs more
/// than the batch, and for mid-sized ones it still cost more throughput than it gave (see
/// bench/RESULTS.md: handing batches of 100-250 µs to workers whenever another batch ran, so
/// that the runtime kept reading and queues grew, formed larger batches but served fewer
/// requests). Longer batches go to the worker threads, so that the runtime's threads keep
/// serving connections.
pub const INLINE_BELOW_US: f64 = 250.0;

thread_local! {
    /// Set while this thread runs a batch (and on worker threads, always). A batch dispatched
    /// from inside one (its completion freed a worker) does not run there: a connection task
    /// never runs other requests' batches before answering its own. It is spawned as a runtime
    /// task instead (it runs once this thread is free) or handed to a worker thread.
    static RUNNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

type Job = (Work, Completer);

/// An in-process agent with a thread budget of `workers` batches at a time. Cheap batches run
/// on the runtime's threads (see [`INLINE_BELOW_US`]), others on its `workers` worker threads;
/// either way one of `workers` slots is held while a batch runs. Batches beyond the free slots
/// wait in the agent (the dispatcher bounds that backlog) and start as slots free.
pub struct LocalAgent {
    name: String,
    workers: u32,
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Shared {
    speed: f64,
    slots: Mutex<Slots>,
    /// Worker threads' queue (batches that already hold a slot).
    tx: Mutex<Option<std_mpsc::Sender<Job>>>,
    /// The runtime that cheap batches are spawned on; none outside one.
    runtime: Option<tokio::runtime::Handle>,
}

struct Slots {
    free: u32,
    waiting: std::collections::VecDeque<Job>,
    stopped: bool,
}

impl Shared {
    /// Whether `work` may run on a runtime thread.
    fn cheap(&self, work: &Work) -> bool {
        self.speed >= 1.0 && work.planned_us <= INLINE_BELOW_US
    }

    /// Starts a batch that holds a slot: here when allowed and not already inside a batch,
    /// else on a runtime task, else on a worker thread.
    fn start(self: &Arc<Self>, work: Work, done: Completer, here: bool) {
        if self.cheap(&work) {
            if here && !RUNNING.get() {
                self.run_here(work, done);
                return;
            }
            if let Some(rt) = &self.runtime {
                let me = self.clone();
                rt.spawn(async move { me.run_here(work, done) });
                return;
            }
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // A stopped agent (no sender, or no worker left to receive) gives the slot back and
        // reports the batch lost.
        let refused = match tx {
            Some(tx) => tx.send((work, done)).err().map(|std_mpsc::SendError((_, done))| done),
            None => Some(done),
        };
        if let Some(done) = refused {
            drop(self.release());
            done.complete(Err(Failure::Lost("the agent is stopped".into())));
        }
    }

    /// Runs a slot-holding batch on this thread, completes it, then starts the next waiting one
    /// elsewhere.
    fn run_here(self: &Arc<Self>, work: Work, done: Completer) {
        /// Restores the flag even if completing panics (the runtime thread lives on).
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                RUNNING.set(self.0);
            }
        }
        let restore = Restore(RUNNING.replace(true));
        let result = run_at_speed(&work, self.speed);
        let next = self.release();
        done.complete(result);
        drop(restore);
        if let Some((w, d)) = next {
            self.start(w, d, false);
        }
    }

    /// Gives a slot back, or hands it to the next waiting batch (returned, to be started).
    fn release(&self) -> Option<Job> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match s.waiting.pop_front() {
            Some(job) if !s.stopped => Some(job),
            _ => {
                s.free += 1;
                None
            }
        }
    }
}

impl LocalAgent {
    /// Starts `workers` threads. `speed` < 1 emulates a slower node: each batch then takes
    /// `1 / speed` times as long (the worker waits out the difference; such batches always run
    /// on the worker threads).
    pub fn start(name: &str, workers: u32, speed: f64) -> LocalAgent {
        let workers = workers.max(1);
        let speed = if speed > 0.0 && speed <= 1.0 { speed } else { 1.0 };
        let (tx, rx) = std_mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            speed,
            slots: Mutex::new(Slots { free: 0, waiting: Default::default(), stopped: false }),
            tx: Mutex::new(Some(tx)),
            runtime: tokio::runtime::Handle::try_current().ok(),
        });
        // A thread the OS refuses is logged and left out: the agent then offers fewer workers.
        let threads: Vec<_> = (0..workers)
            .filter_map(|i| {
                let (rx, shared) = (rx.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("{name}-worker-{i}"))
                    .spawn(move || {
                        RUNNING.set(true);
                        loop {
                            let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                            let Ok((mut work, mut done)) = next else { return };
                            // Worker threads run whatever waits next, cheap or not.
                            loop {
                                let result = run_at_speed(&work, shared.speed);
                                let next = shared.release();
                                done.complete(result);
                                match next {
                                    Some((w, d)) => (work, done) = (w, d),
                                    None => break,
                                }
                            }
                        }
                    })
                    .map_err(|e| tracing::error!(agent = name, "cannot start worker thread {i}: {e}"))
                    .ok()
            })
            .collect();
        let workers = threads.len() as u32;
        shared.slots.lock().unwrap_or_else(|e| e.into_inner()).free = workers;
        LocalAgent { name: name.to_string(), workers, shared, threads: Mutex::new(threads) }
    }

    /// Worker threads that started.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// The relative speed it stands for.
    pub fn speed(&self) -> f64 {
        self.shared.speed
    }
}

/// Runs a batch and stretches it to `1 / speed` of its time (an emulated slower node).
fn run_at_speed(work: &Work, speed: f64) -> std::result::Result<Executed, Failure> {
    let t = Instant::now();
    let mut r = run_work(work);
    if speed < 1.0 {
        std::thread::sleep(t.elapsed().mul_f64(1.0 / speed - 1.0));
        if let Ok(ex) = &mut r {
            ex.service_us = t.elapsed().as_secs_f64() * 1e6;
            ex.engine_us /= speed;
        }
    }
    r
}

impl Agent for LocalAgent {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(&self, work: Work, done: Completer) {
        {
            let mut s = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
            if s.stopped {
                drop(s);
                done.complete(Err(Failure::Lost("the agent is stopped".into())));
                return;
            }
            if s.free == 0 {
                s.waiting.push_back((work, done));
                return;
            }
            s.free -= 1;
        }
        self.shared.start(work, done, true);
    }

    fn stop(&self) {
        // Batches still waiting for a slot are dropped: their completers report them lost.
        let waiting = {
            let mut s = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
            s.stopped = true;
            std::mem::take(&mut s.waiting)
        };
        drop(waiting);
        self.shared.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Runs a batch on this process's engine (local agents; a panic is the batch's error).
pub fn run_work(work: &Work) -> std::result::Result<Executed, Failure> {
    let WorkUnit::Variant { model, variant } = &work.unit else {
        return Err(Failure::Engine(Error::internal("this agent runs whole variants only")));
    };
    catch_unwind(AssertUnwindSafe(|| execute(model, *variant, &work.members)))
        .unwrap_or_else(|_| Err(Error::internal("the engine failed on this batch")))
        .map_err(Failure::Engine)
}

/// The batch's inputs, one tensor per declared input (members concatenated).
pub fn concat_inputs(model: &ModelEntry, members: &[Arc<ValidRequest>]) -> Result<Vec<RawTensor>> {
    (0..model.spec.inputs.len())
        .map(|i| {
            let parts: Vec<&RawTensor> = members.iter().map(|m| &m.inputs[i]).collect();
            if parts.len() == 1 { Ok(parts[0].clone()) } else { batch::concat(&parts) }
        })
        .collect()
}

/// Splits a batch's outputs back into per-member outputs.
pub fn split_outputs(members: &[Arc<ValidRequest>], outputs: Vec<RawTensor>) -> Result<Vec<Vec<RawTensor>>> {
    let sizes: Vec<i64> = members.iter().map(|m| i64::from(m.rows)).collect();
    let mut per_member: Vec<Vec<RawTensor>> = (0..members.len()).map(|_| Vec::new()).collect();
    for out in outputs {
        let parts = if sizes.len() == 1 { vec![out] } else { batch::split(&out, &sizes)? };
        for (k, p) in parts.into_iter().enumerate() {
            per_member[k].push(p);
        }
    }
    Ok(per_member)
}

fn execute(model: &ModelEntry, variant: usize, members: &[Arc<ValidRequest>]) -> Result<Executed> {
    let t0 = Instant::now();
    // A batch of one runs on its request's tensors as they are (no copy).
    let concatenated;
    let inputs = match members {
        [one] => &one.inputs[..],
        _ => {
            concatenated = concat_inputs(model, members)?;
            &concatenated[..]
        }
    };
    let t1 = Instant::now();
    let outputs = model.variants[variant].session.run(inputs)?;
    let t2 = Instant::now();
    let outputs = split_outputs(members, outputs)?;
    let t3 = Instant::now();
    Ok(Executed {
        outputs,
        compute_input: t1 - t0,
        compute_infer: t2 - t1,
        compute_output: t3 - t2,
        service_us: (t3 - t0).as_secs_f64() * 1e6,
        engine_us: (t2 - t1).as_secs_f64() * 1e6,
    })
}

/// A test agent: holds every batch until the test completes it (or drops it).
#[derive(Default)]
pub struct FakeAgent {
    name: String,
    pub held: Mutex<Vec<(Work, Completer)>>,
    pub loads: Mutex<Vec<(String, String)>>,
    pub disconnected: Mutex<Option<String>>,
}

impl FakeAgent {
    pub fn new(name: &str) -> FakeAgent {
        FakeAgent { name: name.into(), ..FakeAgent::default() }
    }

    /// Takes the batches received so far.
    pub fn take(&self) -> Vec<(Work, Completer)> {
        std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs every held batch on the engine and completes it.
    pub fn run_held(&self) -> usize {
        let held = self.take();
        let n = held.len();
        for (w, c) in held {
            c.complete(run_work(&w));
        }
        n
    }
}

impl Agent for FakeAgent {
    fn name(&self) -> &str {
        &self.name
    }
    fn run(&self, work: Work, done: Completer) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).push((work, done));
    }
    fn load(&self, model: &str, variant: &str) {
        self.loads.lock().unwrap_or_else(|e| e.into_inner()).push((model.into(), variant.into()));
    }
    fn disconnect(&self, reason: &str) {
        *self.disconnected.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.into());
    }
}
