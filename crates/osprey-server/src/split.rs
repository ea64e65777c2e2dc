//! The gateway's driver of split inference (the adaptive LFM orchestration paper's live side).
//!
//! Sentences are tokenized here (the gateway is in the trusted zone); every decision comes from
//! `osprey_policy::split`: the planner and its hysteresis ([`Reviser`]) and the epoch state
//! machine ([`Epochs`]). This module only carries them out:
//! - **Monitoring and capacity profiling.** An agent that offers a split model is asked for its
//!   profile when it attaches (each unit run alone there: compute and memory; real transfers to
//!   every peer: latency and bandwidth), and every other agent measures its link to the newcomer.
//!   The gateway measures its own link to each agent the same way. At run time every answer
//!   carries each stage's compute time, and `observed / profiled` feeds the reviser's speed
//!   factor of that node.
//! - **Reconfiguration.** A new plan is proposed as an epoch: `LoadRange` to each of its agents
//!   (with the next hop's peer address), and it becomes current once all have answered. A
//!   request runs wholly on the epoch it began in; an old epoch's ranges are unloaded once its
//!   last request has finished.
//! - **Faults.** A node that leaves fails the requests in flight on its epochs; each is retried
//!   (up to [`RETRIES`] times, within its deadline) on the next epoch, so nothing is lost and
//!   nothing is answered twice (a request's answer is taken out of `waiting` exactly once).

use crate::agent_pb::{self, gateway_message};
use crate::cluster::RemoteAgent;
use osprey_core::error::{Error, ErrorCode, Result};
use osprey_core::split::SplitSpec;
use osprey_engine::text::TextEncoder;
use osprey_policy::split::{
    Assignment, EpochAction, Epochs, Link, NodeCap, Objective, Reviser, RevisionRule, SplitProblem, Strategy,
    Trigger,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};

/// Attempts per sentence (the first and the retries after a fault).
pub const RETRIES: usize = 4;
/// A node whose range failed to load is left out of plans this long.
const LOAD_FAILURE_BACKOFF: Duration = Duration::from_secs(10);
/// A link nobody measured yet (pessimistic: a slow edge link).
const UNKNOWN_LINK: Link = Link { latency_us: 2000.0, bytes_per_us: 1.0 };

struct Peer {
    agent: Arc<RemoteAgent>,
    addr: String,
    trusted: bool,
    memory_mb: f64,
    /// Per unit compute (µs) and memory (KiB), as the node measured them.
    profile: Option<(Vec<f64>, Vec<u64>)>,
    /// Links to other agents by their peer address.
    links: BTreeMap<String, Link>,
    /// The gateway's link to this agent.
    gateway: Option<Link>,
    /// Activations received per boundary unit (from its heartbeats).
    received: BTreeMap<u32, u64>,
}

/// One request's answer.
pub struct Reply {
    pub hidden: Vec<f32>,
    pub epoch: u64,
    pub attempts: usize,
}

struct Waiter {
    stages: Vec<Assignment>,
    tx: oneshot::Sender<Result<(Vec<f32>, Vec<f64>)>>,
}

/// A plan as it was put in place, for status and benchmarks.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanRecord {
    pub epoch: u64,
    /// Seconds since the driver started.
    pub proposed_s: f64,
    pub active_s: Option<f64>,
    pub trigger: String,
    /// `node=start..end`.
    pub stages: Vec<String>,
    pub predicted_ms: f64,
}

struct State {
    peers: BTreeMap<String, Peer>,
    reviser: Reviser,
    epochs: Epochs,
    waiting: HashMap<u64, Waiter>,
    failed: HashMap<String, Instant>,
    history: Vec<PlanRecord>,
    /// Profiles run one node at a time (two at once on one machine would measure each other).
    profile_queue: std::collections::VecDeque<(String, agent_pb::ProfileSplit)>,
    profiling: Option<String>,
    answered: u64,
    retried: u64,
    failed_requests: u64,
}

/// What `osprey status` and `/metrics` show of a split model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SplitStatus {
    pub model: String,
    /// Units pinned to the trusted zone.
    pub private_units: usize,
    pub epoch: Option<u64>,
    pub pending: Option<u64>,
    /// `node -> start..end`, in chain order.
    pub stages: Vec<(String, String)>,
    pub nodes: Vec<SplitNodeStatus>,
    pub plans: Vec<PlanRecord>,
    pub answered: u64,
    pub retried: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SplitNodeStatus {
    pub name: String,
    pub trusted: bool,
    pub profiled: bool,
    pub speed_factor: f64,
    pub unit_ms: Vec<f64>,
    /// Memory each unit took when built here, MB.
    pub unit_mb: Vec<f64>,
    /// Links measured from this node: `peer name -> (latency ms, MB/s)`.
    pub links: BTreeMap<String, (f64, f64)>,
    pub gateway_link: Option<(f64, f64)>,
    pub received: BTreeMap<u32, u64>,
}

pub struct SplitDriver {
    pub spec: SplitSpec,
    encoder: TextEncoder,
    state: Mutex<State>,
    next_request: AtomicU64,
    epoch_changed: Notify,
    started: Instant,
    objective: Objective,
    /// Units pinned to the trusted zone now (`split.toml`'s, until changed at run time).
    private_units: std::sync::atomic::AtomicUsize,
}

impl SplitDriver {
    pub fn new(spec: SplitSpec) -> Result<Arc<SplitDriver>> {
        let encoder = TextEncoder::load(&spec.tokenizer_path()?, spec.seq_len)?;
        let strategy = Strategy::parse(&spec.strategy).unwrap_or(Strategy::Planner);
        let rule =
            RevisionRule { threshold: spec.threshold, min_gain: spec.min_gain, ..RevisionRule::default() };
        let objective =
            if spec.objective == "throughput" { Objective::Throughput } else { Objective::Latency };
        Ok(Arc::new(SplitDriver {
            encoder,
            state: Mutex::new(State {
                peers: BTreeMap::new(),
                reviser: Reviser::new(strategy, rule),
                epochs: Epochs::new(),
                waiting: HashMap::new(),
                failed: HashMap::new(),
                history: Vec::new(),
                profile_queue: Default::default(),
                profiling: None,
                answered: 0,
                retried: 0,
                failed_requests: 0,
            }),
            next_request: AtomicU64::new(1),
            epoch_changed: Notify::new(),
            started: Instant::now(),
            objective,
            private_units: std::sync::atomic::AtomicUsize::new(spec.private_units),
            spec,
        }))
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// What clients send: sentences.
    pub fn input_spec(&self) -> osprey_core::model::TensorSpec {
        osprey_core::model::TensorSpec {
            name: "text".into(),
            datatype: osprey_core::tensor::DataType::Bytes,
            shape: vec![-1],
        }
    }

    /// What they get back: one embedding per sentence.
    pub fn output_spec(&self) -> osprey_core::model::TensorSpec {
        osprey_core::model::TensorSpec {
            name: "embedding".into(),
            datatype: osprey_core::tensor::DataType::Fp32,
            shape: vec![-1, self.spec.hidden as i64],
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ready: a plan is current.
    pub fn is_ready(&self) -> bool {
        self.lock().epochs.current().is_some()
    }

    /// An agent that offers this model attached.
    pub fn node_joined(
        self: &Arc<Self>,
        name: &str,
        agent: Arc<RemoteAgent>,
        addr: String,
        labels: &HashMap<String, String>,
        memory_mb: u64,
    ) {
        let (k, v) = &self.spec.trusted_label;
        let trusted = labels.get(k) == Some(v);
        let mut st = self.lock();
        let others: Vec<(String, String)> =
            st.peers.iter().filter(|(n, _)| *n != name).map(|(n, p)| (n.clone(), p.addr.clone())).collect();
        st.profile_queue.retain(|(n, _)| n != name);
        st.profile_queue.push_back((
            name.to_string(),
            agent_pb::ProfileSplit {
                model: self.spec.name.clone(),
                units: true,
                peers: others.iter().map(|(_, a)| a.clone()).collect(),
            },
        ));
        for (other, _) in &others {
            st.profile_queue.push_back((
                other.clone(),
                agent_pb::ProfileSplit {
                    model: self.spec.name.clone(),
                    units: false,
                    peers: vec![addr.clone()],
                },
            ));
        }
        tracing::info!(model = %self.spec.name, node = name, %addr, trusted, "split agent joined; profiling");
        st.peers.insert(
            name.to_string(),
            Peer {
                agent,
                addr: addr.clone(),
                trusted,
                memory_mb: memory_mb as f64,
                profile: None,
                links: BTreeMap::new(),
                gateway: None,
                received: BTreeMap::new(),
            },
        );
        if st.profiling.as_deref() == Some(name) {
            st.profiling = None;
        }
        Self::next_profile(&mut st);
        drop(st);
        // The gateway's own link to the agent, measured with the same probe.
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            match probe_link(&addr, &me.spec.name).await {
                Ok(link) => {
                    let mut st = me.lock();
                    if let Some(p) = st.peers.get_mut(&name) {
                        p.gateway = Some(link);
                    }
                }
                Err(e) => tracing::warn!(node = %name, "gateway link probe failed: {e}"),
            }
        });
    }

    /// Sends the next queued profile request when none is running.
    fn next_profile(st: &mut State) {
        while st.profiling.is_none() {
            let Some((name, req)) = st.profile_queue.pop_front() else { return };
            if let Some(p) = st.peers.get(&name)
                && p.agent.send_kind(gateway_message::Kind::ProfileSplit(req))
            {
                st.profiling = Some(name);
            }
        }
    }

    /// Changes how many leading units are pinned to the trusted zone, and re-plans.
    pub fn set_private_units(self: &Arc<Self>, k: usize) -> Result<()> {
        if k > self.spec.units() {
            return Err(Error::invalid(format!(
                "private_units {k} exceeds the model's {} units",
                self.spec.units()
            )));
        }
        self.private_units.store(k, Ordering::Relaxed);
        let mut st = self.lock();
        st.reviser.privacy_changed();
        tracing::info!(model = %self.spec.name, private_units = k, "privacy pin changed; re-planning");
        self.replan(&mut st);
        Ok(())
    }

    /// An agent's connection ended.
    pub fn node_left(self: &Arc<Self>, name: &str, agent: &Arc<RemoteAgent>) {
        let mut st = self.lock();
        // A node that reconnected under the same name is not gone.
        if !st.peers.get(name).is_some_and(|p| Arc::ptr_eq(&p.agent, agent)) {
            return;
        }
        st.peers.remove(name);
        st.profile_queue.retain(|(n, _)| n != name);
        if st.profiling.as_deref() == Some(name) {
            st.profiling = None;
        }
        Self::next_profile(&mut st);
        tracing::warn!(model = %self.spec.name, node = name, "split agent left");
        st.epochs.node_lost(name);
        // Requests whose chain runs through it fail now and are retried on the next epoch.
        let lost: Vec<u64> = st
            .waiting
            .iter()
            .filter(|(_, w)| w.stages.iter().any(|s| s.node == name))
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(w) = st.waiting.remove(&id) {
                let _ = w.tx.send(Err(Error::unavailable(format!("node {name} left during the request"))));
            }
        }
        st.reviser.membership_changed();
        self.replan(&mut st);
    }

    /// An agent's capacity profile.
    pub fn on_profile(self: &Arc<Self>, name: &str, p: agent_pb::SplitProfile) {
        let mut st = self.lock();
        if st.profiling.as_deref() == Some(name) {
            st.profiling = None;
        }
        Self::next_profile(&mut st);
        let addrs: HashMap<String, String> =
            st.peers.iter().map(|(n, p)| (p.addr.clone(), n.clone())).collect();
        let Some(peer) = st.peers.get_mut(name) else { return };
        if !p.error.is_empty() {
            tracing::warn!(node = name, "split profile failed: {}", p.error);
            return;
        }
        if p.unit_us.len() == self.spec.units() && p.unit_memory_kib.len() == self.spec.units() {
            tracing::info!(node = name, unit_ms = ?p.unit_us.iter().map(|u| (u / 100.0).round() / 10.0).collect::<Vec<_>>(), "split profile");
            peer.profile = Some((p.unit_us, p.unit_memory_kib));
        }
        for l in p.links {
            if addrs.contains_key(&l.peer) && l.latency_us.is_finite() && l.bytes_per_us > 0.0 {
                peer.links.insert(l.peer, Link { latency_us: l.latency_us, bytes_per_us: l.bytes_per_us });
            }
        }
        st.reviser.membership_changed();
        self.replan(&mut st);
    }

    pub fn on_heartbeat(&self, name: &str, received: &HashMap<u32, u64>) {
        if received.is_empty() {
            return;
        }
        if let Some(p) = self.lock().peers.get_mut(name) {
            p.received = received.iter().map(|(k, v)| (*k, *v)).collect();
        }
    }

    pub fn on_range_loaded(self: &Arc<Self>, name: &str, r: agent_pb::RangeLoaded) {
        let mut st = self.lock();
        if !r.error.is_empty() {
            tracing::warn!(node = name, epoch = r.epoch, "range load failed: {}", r.error);
            st.failed.insert(name.to_string(), Instant::now());
        }
        st.epochs.handle_loaded(r.epoch, name, r.error.is_empty());
        self.pump(&mut st);
    }

    pub fn on_result(self: &Arc<Self>, r: agent_pb::SplitResult) {
        let mut st = self.lock();
        let Some(w) = st.waiting.remove(&r.request_id) else { return };
        let result = if !r.error.is_empty() {
            Err(Error::unavailable(r.error))
        } else {
            let n = self.spec.seq_len * self.spec.hidden;
            if r.shape != [1, self.spec.seq_len as i64, self.spec.hidden as i64] || r.hidden.len() != n * 4 {
                Err(Error::internal("a node returned a hidden state of the wrong shape"))
            } else {
                let h =
                    r.hidden.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                // Each stage's observed compute against its profile: the speed factor. Only
                // requests of the current plan count: a straggler of an older epoch measured the
                // node under the load it had then, and would make a node just left look idle.
                let current = st.epochs.current().map(|(e, _)| e) == Some(r.epoch);
                for (stage, us) in w.stages.iter().zip(&r.stage_us).filter(|_| current) {
                    let expect = st
                        .peers
                        .get(&stage.node)
                        .and_then(|p| p.profile.as_ref())
                        .map(|(u, _)| u[stage.units.clone()].iter().sum::<f64>());
                    if let Some(e) = expect.filter(|e| *e > 0.0) {
                        st.reviser.observe(&stage.node, us / e);
                    }
                }
                Ok((h, r.stage_us))
            }
        };
        let _ = w.tx.send(result);
        if st.reviser.pending().is_some() && st.epochs.pending().is_none() {
            self.replan(&mut st);
        }
    }

    /// The planning problem from what is measured now (nodes with a profile, not backing off).
    fn problem(&self, st: &mut State) -> SplitProblem {
        let now = Instant::now();
        st.failed.retain(|_, t| now.duration_since(*t) < LOAD_FAILURE_BACKOFF);
        let units = self.spec.units();
        let names: Vec<&String> = st
            .peers
            .iter()
            .filter(|(n, p)| p.profile.is_some() && !st.failed.contains_key(*n))
            .map(|(n, _)| n)
            .collect();
        let mut unit_mem = vec![0.0f64; units];
        for n in &names {
            if let Some((_, kib)) = &st.peers[*n].profile {
                for (m, k) in unit_mem.iter_mut().zip(kib) {
                    *m = m.max(*k as f64 / 1024.0);
                }
            }
        }
        let nodes: Vec<NodeCap> = names
            .iter()
            .map(|n| {
                let p = &st.peers[*n];
                NodeCap {
                    name: (*n).clone(),
                    trusted: p.trusted,
                    memory_mb: p.memory_mb,
                    unit_us: p.profile.as_ref().map(|(u, _)| u.clone()).unwrap_or_default(),
                }
            })
            .collect();
        let links = names
            .iter()
            .map(|a| {
                names
                    .iter()
                    .map(|b| {
                        let (pa, pb) = (&st.peers[*a], &st.peers[*b]);
                        // Measured either way; links are taken as symmetric when one side only.
                        pa.links
                            .get(&pb.addr)
                            .or_else(|| pb.links.get(&pa.addr))
                            .copied()
                            .unwrap_or(UNKNOWN_LINK)
                    })
                    .collect()
            })
            .collect();
        let gateway = names.iter().map(|n| st.peers[*n].gateway.unwrap_or(UNKNOWN_LINK)).collect();
        let (seq, hidden) = (self.spec.seq_len as f64, self.spec.hidden as f64);
        let mut boundary = vec![seq * hidden * 4.0 + seq * 8.0; units];
        if let Some(last) = boundary.last_mut() {
            *last = seq * hidden * 4.0;
        }
        SplitProblem {
            unit_memory_mb: unit_mem,
            boundary_bytes: boundary,
            input_bytes: seq * 16.0,
            nodes,
            links,
            gateway,
            private_units: self.private_units.load(Ordering::Relaxed),
            objective: self.objective,
        }
    }

    /// Asks the reviser; a new plan becomes a proposed epoch.
    fn replan(&self, st: &mut State) {
        if st.reviser.pending().is_none() {
            return;
        }
        let p = self.problem(st);
        if p.nodes.is_empty() {
            st.reviser.revise(&p, self.now_us());
            return;
        }
        let Some((plan, trigger)) = st.reviser.revise(&p, self.now_us()) else {
            self.pump(st);
            return;
        };
        let mut scaled = p.clone();
        st.reviser.apply_factors(&mut scaled);
        let predicted = osprey_policy::split::evaluate(&scaled, &plan);
        let stages = osprey_policy::split::assignments(&p, &plan);
        let epoch = st.epochs.propose(stages.clone());
        let record = PlanRecord {
            epoch,
            proposed_s: self.started.elapsed().as_secs_f64(),
            active_s: None,
            trigger: match &trigger {
                Trigger::First => "first".into(),
                Trigger::Speed { node, factor } => format!("speed {node} x{factor:.2}"),
                Trigger::Membership => "membership".into(),
                Trigger::Privacy => "privacy".into(),
            },
            stages: describe(&stages),
            predicted_ms: predicted.latency_us / 1e3,
        };
        tracing::info!(model = %self.spec.name, epoch, trigger = %record.trigger, plan = ?record.stages, predicted_ms = record.predicted_ms, "split plan proposed");
        st.history.push(record);
        self.pump(st);
    }

    /// Carries out the epoch machine's actions.
    fn pump(&self, st: &mut State) {
        while let Some(a) = st.epochs.poll_action() {
            match a {
                EpochAction::Load { epoch, stage } => {
                    let next_addr = stage.next.as_ref().and_then(|n| st.peers.get(n)).map(|p| p.addr.clone());
                    match st.peers.get(&stage.node) {
                        Some(p) => {
                            p.agent.send_kind(gateway_message::Kind::LoadRange(agent_pb::LoadRange {
                                model: self.spec.name.clone(),
                                epoch,
                                start: stage.units.start as u32,
                                end: stage.units.end as u32,
                                next_addr: next_addr.unwrap_or_default(),
                            }));
                        }
                        None => st.epochs.handle_loaded(epoch, &stage.node, false),
                    }
                }
                EpochAction::Activated { epoch } => {
                    let t = self.started.elapsed().as_secs_f64();
                    if let Some(r) = st.history.iter_mut().find(|r| r.epoch == epoch) {
                        r.active_s = Some(t);
                    }
                    tracing::info!(model = %self.spec.name, epoch, "split plan active");
                    self.epoch_changed.notify_waiters();
                }
                EpochAction::Unload { epoch, node } => {
                    if let Some(p) = st.peers.get(&node) {
                        p.agent.send_kind(gateway_message::Kind::UnloadRange(agent_pb::UnloadRange {
                            model: self.spec.name.clone(),
                            epoch,
                        }));
                    }
                }
                EpochAction::Abandoned { epoch, node } => {
                    tracing::warn!(model = %self.spec.name, epoch, node, "split plan abandoned; re-planning");
                    st.reviser.membership_changed();
                    // Re-planned on the next event (a profile, a load answer, a departure):
                    // planning here again could loop on the same failing node.
                }
            }
        }
    }

    /// Embeds each sentence (chains run concurrently, so that stages pipeline).
    pub async fn embed(
        self: &Arc<Self>,
        texts: &[String],
        deadline: Instant,
    ) -> Result<(Vec<Vec<f32>>, Vec<Reply>)> {
        let runs = texts.iter().map(|t| self.run_one(t, deadline));
        let replies: Vec<Result<Reply>> = futures_join_all(runs).await;
        let mut out = Vec::with_capacity(replies.len());
        let mut meta = Vec::with_capacity(replies.len());
        for (r, t) in replies.into_iter().zip(texts) {
            let r = r?;
            let e = self.encoder.encode(t)?;
            out.push(osprey_engine::split::pool(&r.hidden, &e.mask, self.spec.hidden));
            meta.push(r);
        }
        Ok((out, meta))
    }

    async fn run_one(self: &Arc<Self>, text: &str, deadline: Instant) -> Result<Reply> {
        let e = self.encoder.encode(text)?;
        let ids: Vec<u8> = e.ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mask: Vec<u8> = e.mask.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut last_error = None;
        for attempt in 1..=RETRIES {
            // Wait for a current epoch (the first plan, or the next one after a fault).
            let begun = loop {
                let notified = self.epoch_changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let id = self.next_request.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                let started = {
                    let mut st = self.lock();
                    match st.epochs.begin() {
                        Some((epoch, stages)) => {
                            let stages = stages.to_vec();
                            let first = st.peers.get(&stages[0].node).map(|p| p.agent.clone());
                            st.waiting.insert(id, Waiter { stages: stages.clone(), tx });
                            Some((epoch, id, first))
                        }
                        None => None,
                    }
                };
                if let Some(s) = started {
                    break (s, rx);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                    let why = last_error.map_or_else(
                        || {
                            "no split plan is active (too few profiled agents, or none in the trusted zone)"
                                .to_string()
                        },
                        |e: Error| e.message,
                    );
                    return Err(Error::new(ErrorCode::Unavailable, format!("{}: {why}", self.spec.name)));
                }
            };
            let ((epoch, id, first), rx) = begun;
            let sent = first.is_some_and(|a| {
                a.send_kind(gateway_message::Kind::RunRange(agent_pb::RunRange {
                    request_id: id,
                    model: self.spec.name.clone(),
                    epoch,
                    ids: ids.clone(),
                    mask: mask.clone(),
                }))
            });
            let outcome = if sent {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(Error::unavailable("the request was dropped")),
                    Err(_) => {
                        Err(Error::new(ErrorCode::DeadlineExceeded, "the split chain did not answer in time"))
                    }
                }
            } else {
                Err(Error::unavailable("the first node's connection is closed"))
            };
            let mut st = self.lock();
            st.waiting.remove(&id);
            st.epochs.finish(epoch);
            self.pump(&mut st);
            match outcome {
                Ok((hidden, _)) => {
                    st.answered += 1;
                    if attempt > 1 {
                        st.retried += 1;
                    }
                    return Ok(Reply { hidden, epoch, attempts: attempt });
                }
                Err(e) if e.code == ErrorCode::DeadlineExceeded => {
                    st.failed_requests += 1;
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(request = id, epoch, attempt, "split attempt failed: {}", e.message);
                    last_error = Some(e);
                }
            }
        }
        self.lock().failed_requests += 1;
        Err(last_error.unwrap_or_else(|| Error::unavailable("split inference failed")))
    }

    pub fn status(&self) -> SplitStatus {
        let st = self.lock();
        let current = st.epochs.current();
        let names: BTreeMap<&String, &String> = st.peers.iter().map(|(n, p)| (&p.addr, n)).collect();
        SplitStatus {
            model: self.spec.name.clone(),
            private_units: self.private_units.load(Ordering::Relaxed),
            epoch: current.map(|(e, _)| e),
            pending: st.epochs.pending(),
            stages: current
                .map(|(_, s)| {
                    s.iter()
                        .map(|a| (a.node.clone(), format!("{}..{}", a.units.start, a.units.end)))
                        .collect()
                })
                .unwrap_or_default(),
            nodes: st
                .peers
                .iter()
                .map(|(n, p)| SplitNodeStatus {
                    name: n.clone(),
                    trusted: p.trusted,
                    profiled: p.profile.is_some(),
                    speed_factor: st.reviser.factor(n),
                    unit_ms: p
                        .profile
                        .as_ref()
                        .map(|(u, _)| u.iter().map(|x| x / 1e3).collect())
                        .unwrap_or_default(),
                    unit_mb: p
                        .profile
                        .as_ref()
                        .map(|(_, m)| m.iter().map(|k| *k as f64 / 1024.0).collect())
                        .unwrap_or_default(),
                    links: p
                        .links
                        .iter()
                        .map(|(addr, l)| {
                            let peer = names.get(addr).map_or(addr.clone(), |n| (*n).clone());
                            (peer, (l.latency_us / 1e3, l.bytes_per_us))
                        })
                        .collect(),
                    gateway_link: p.gateway.map(|l| (l.latency_us / 1e3, l.bytes_per_us)),
                    received: p.received.clone(),
                })
                .collect(),
            plans: st.history.clone(),
            answered: st.answered,
            retried: st.retried,
            failed: st.failed_requests,
        }
    }
}

fn describe(stages: &[Assignment]) -> Vec<String> {
    stages.iter().map(|a| format!("{}={}..{}", a.node, a.units.start, a.units.end)).collect()
}

/// Runs futures concurrently on the caller's task and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// The gateway's link to an agent's peer address: the same probe agents use between them.
async fn probe_link(addr: &str, _model: &str) -> std::result::Result<Link, String> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut c = agent_pb::agent_peer_client::AgentPeerClient::new(ch);
    // The gateway is not a peer: a probe without the token is refused, and the refusal's round
    // trip is still a round trip. Latency only; bandwidth from the first bytes is not needed
    // (what the gateway sends and receives is small beside the activations between agents).
    let mut rtt = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let _ = c.probe(agent_pb::ProbeData { payload: vec![0; 64] }).await;
        rtt = rtt.min(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(Link { latency_us: rtt / 2.0, bytes_per_us: 100.0 })
}
