//! An in-process node agent: a fixed pool of worker threads (its thread budget) executing
//! batches. A semaphore with one permit per worker is the backpressure: the scheduling loop
//! takes a permit before it forms a batch, so batches grow while every worker is busy, and the
//! permit is released (in `Drop`) when the batch has been answered.

use crate::gateway::{InferOutcome, ModelEntry, ValidRequest, unix_ms};
use crate::metrics::{Metrics, VariantLabels};
use osprey_core::error::{Error, Result};
use osprey_core::tensor::RawTensor;
use osprey_engine::batch;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// One request inside a batch.
pub struct Member {
    pub req: ValidRequest,
    pub tenant: String,
    /// The estimated accuracy of this input on the batch's variant.
    pub estimate: f64,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<InferOutcome>>,
}

/// A batch for one variant of one model.
pub struct Job {
    pub model: Arc<ModelEntry>,
    pub variant: usize,
    pub members: Vec<Member>,
    pub dispatched: Instant,
    /// The worker slot it holds on a local agent (released when the batch is done).
    pub permit: Option<OwnedSemaphorePermit>,
    /// Where a local agent reports the batch's outcome for instance selection:
    /// (pool, local index, predicted service time µs).
    pub health: Option<(Arc<crate::cluster::Pool>, usize, f64)>,
    /// Where the observed service time goes back to the scheduler.
    pub feedback: Option<tokio::sync::mpsc::UnboundedSender<Observation>>,
}

/// A batch's observed service time, for the scheduler's slowdown estimate.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub variant: usize,
    pub rows: u32,
    pub service_us: f64,
}

pub struct LocalAgent {
    name: String,
    workers: u32,
    permits: Arc<Semaphore>,
    tx: Mutex<Option<std_mpsc::Sender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl LocalAgent {
    /// Starts `workers` threads; `changed` is notified whenever a worker becomes free.
    pub fn start(
        name: &str,
        workers: u32,
        metrics: Arc<Metrics>,
        changed: Arc<tokio::sync::Notify>,
    ) -> LocalAgent {
        let workers = workers.max(1);
        let (tx, rx) = std_mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        // A thread the OS refuses is logged and left out: the agent then offers fewer workers
        // (with none, its requests expire with explicit errors) rather than crashing the server.
        let threads: Vec<_> = (0..workers)
            .filter_map(|i| {
                let rx = rx.clone();
                let metrics = metrics.clone();
                let changed = changed.clone();
                let node = name.to_string();
                std::thread::Builder::new()
                    .name(format!("{name}-worker-{i}"))
                    .spawn(move || {
                        loop {
                            let job = match rx.lock() {
                                Ok(r) => r.recv(),
                                Err(_) => return,
                            };
                            match job {
                                Ok(job) => run_job(job, &node, &metrics, &changed),
                                Err(_) => return,
                            }
                        }
                    })
                    .map_err(|e| tracing::error!(agent = name, "cannot start worker thread {i}: {e}"))
                    .ok()
            })
            .collect();
        let workers = threads.len() as u32;
        LocalAgent {
            name: name.to_string(),
            workers,
            permits: Arc::new(Semaphore::new(workers as usize)),
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes a free worker now, if there is one.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    pub fn free(&self) -> usize {
        self.permits.available_permits()
    }

    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// Waits for a free worker; `None` once the agent is stopped.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    pub fn busy(&self) -> bool {
        self.permits.available_permits() < self.workers as usize
    }

    pub fn submit(&self, job: Job) {
        let tx = self.tx.lock().ok().and_then(|t| t.clone());
        if let Some(tx) = tx {
            if let Err(std_mpsc::SendError(job)) = tx.send(job) {
                fail_all(job.members, Error::unavailable("the agent is stopped"));
            }
        } else {
            fail_all(job.members, Error::unavailable("the agent is stopped"));
        }
    }

    /// Stops the workers after the batches already submitted.
    pub fn stop(&self) {
        self.permits.close();
        if let Ok(mut t) = self.tx.lock() {
            t.take();
        }
        let threads = self.threads.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

pub(crate) fn fail_all(members: Vec<Member>, e: Error) {
    for m in members {
        let _ = m.reply.send(Err(e.clone()));
    }
}

fn run_job(job: Job, node: &str, metrics: &Metrics, changed: &tokio::sync::Notify) {
    let Job { model, variant, members, dispatched, permit, feedback, health } = job;
    let result = catch_unwind(AssertUnwindSafe(|| execute(&model, variant, &members)))
        .unwrap_or_else(|_| Err(Error::internal("the engine failed on this batch")));
    if let Some((pool, i, predicted)) = &health {
        pool.local_done(*i, result.is_ok(), dispatched.elapsed().as_secs_f64() * 1e6, *predicted);
    }
    drop(permit);
    changed.notify_waiters();
    deliver(&model, variant, node, members, result, dispatched, feedback.as_ref(), metrics);
}

/// Answers every member of an executed batch (or fails them all), records statistics and
/// metrics, and reports the observed service time. Shared by local and remote agents.
#[allow(clippy::too_many_arguments)]
pub(crate) fn deliver(
    model: &Arc<ModelEntry>,
    variant: usize,
    node: &str,
    members: Vec<Member>,
    result: Result<Executed>,
    dispatched: Instant,
    feedback: Option<&tokio::sync::mpsc::UnboundedSender<Observation>>,
    metrics: &Metrics,
) {
    let ve = &model.variants[variant];
    let labels = VariantLabels { model: model.name().to_string(), variant: ve.spec.name.clone() };
    let (per_member, t_in, t_infer, t_out) = match result {
        Ok(r) => r,
        Err(e) => {
            if let Ok(mut s) = ve.stats.lock() {
                for m in &members {
                    s.fail.add(m.enqueued.elapsed());
                }
            }
            tracing::warn!(model = model.name(), variant = %ve.spec.name, node, "batch failed: {e}");
            fail_all(members, e);
            return;
        }
    };
    let rows: u32 = members.iter().map(|m| m.req.rows).sum();
    let compute = t_in + t_infer + t_out;
    metrics.batch_size.get_or_create(&labels).observe(rows as f64);
    metrics.compute_input.get_or_create(&labels).observe(t_in.as_secs_f64());
    metrics.compute_infer.get_or_create(&labels).observe(t_infer.as_secs_f64());
    metrics.compute_output.get_or_create(&labels).observe(t_out.as_secs_f64());
    if let Ok(mut s) = ve.stats.lock() {
        s.execution_count += 1;
        s.last_inference_ms = unix_ms();
        let b = s.batches.entry(rows as u64).or_default();
        b.compute_input.add(t_in);
        b.compute_infer.add(t_infer);
        b.compute_output.add(t_out);
        for m in &members {
            s.inference_count += m.req.rows as u64;
            s.success.add(m.enqueued.elapsed());
            s.queue.add(dispatched.saturating_duration_since(m.enqueued));
            s.compute_input.add(t_in);
            s.compute_infer.add(t_infer);
            s.compute_output.add(t_out);
        }
    }
    let done = Instant::now();
    if let Some(f) = feedback {
        let service_us = done.saturating_duration_since(dispatched).as_secs_f64() * 1e6;
        let _ = f.send(Observation { variant, rows, service_us });
    }
    let classes = model.spec.labels.len();
    for (m, outputs) in members.into_iter().zip(per_member) {
        if let Some(first) = outputs.first()
            && classes > 0
            && let Ok(p) = first.to_f32()
        {
            for row in p.chunks_exact(classes) {
                let arg = (0..classes).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0);
                model.estimator.observe(arg);
            }
        }
        let queue = dispatched.saturating_duration_since(m.enqueued);
        metrics.queue.get_or_create(&labels).observe(queue.as_secs_f64());
        let outputs = m.req.outputs.iter().filter_map(|&i| outputs.get(i).map(|t| (i, t.clone()))).collect();
        let _ = m.reply.send(Ok(InferOutcome {
            model: model.clone(),
            variant,
            node: node.to_string(),
            outputs,
            queue,
            compute,
            deadline_met: done <= m.deadline,
            estimated_accuracy: m.estimate,
            batch_size: rows,
            tenant: m.tenant,
        }));
    }
}

pub(crate) type Executed = (Vec<Vec<RawTensor>>, Duration, Duration, Duration);

fn execute(model: &ModelEntry, variant: usize, members: &[Member]) -> Result<Executed> {
    let t0 = Instant::now();
    let n_inputs = model.spec.inputs.len();
    let mut inputs = Vec::with_capacity(n_inputs);
    for i in 0..n_inputs {
        let parts: Vec<&RawTensor> = members.iter().map(|m| &m.req.inputs[i]).collect();
        inputs.push(if parts.len() == 1 { parts[0].clone() } else { batch::concat(&parts)? });
    }
    let t1 = Instant::now();
    let outputs = model.variants[variant].session.run(&inputs)?;
    let t2 = Instant::now();
    let sizes: Vec<i64> = members.iter().map(|m| m.req.rows as i64).collect();
    let mut per_member: Vec<Vec<RawTensor>> = (0..members.len()).map(|_| Vec::new()).collect();
    for out in &outputs {
        let parts = if sizes.len() == 1 { vec![out.clone()] } else { batch::split(out, &sizes)? };
        for (k, p) in parts.into_iter().enumerate() {
            per_member[k].push(p);
        }
    }
    let t3 = Instant::now();
    Ok((per_member, t1 - t0, t2 - t1, t3 - t2))
}
