//! The gateway, its cluster driver and node handling, tested through the fake agent (which
//! holds batches until the test decides what happens to them), on the bundled models.

use osprey_core::model::scan_repository;
use osprey_core::profile::VariantProfile;
use osprey_core::tensor::{DataType, RawTensor};
use osprey_policy::dispatch::NodeInfo;
use osprey_server::agent::{Agent, Failure, FakeAgent};
use osprey_server::gateway::{Gateway, GatewayConfig, InputTensor, RequestOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn gateway() -> Arc<Gateway> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let (models, problems) = scan_repository(&repo).expect("bundled models");
    Gateway::start(GatewayConfig { problems, ..GatewayConfig::for_test(models) }, |_, _, _| {
        VariantProfile::default()
    })
}

fn fake(gw: &Gateway, name: &str, workers: u32) -> Arc<FakeAgent> {
    let f = Arc::new(FakeAgent::new(name));
    let agent: Arc<dyn Agent> = f.clone();
    gw.cluster.join(NodeInfo::local(name, workers), agent, workers);
    f
}

fn digits_request(gw: &Gateway, pinned: &str) -> osprey_server::gateway::ValidRequest {
    let t = RawTensor::from_bytes(DataType::Fp32, vec![1, 8, 8], vec![0; 256]).unwrap();
    gw.validate(
        "digits",
        pinned,
        String::new(),
        vec![InputTensor { name: "image".into(), tensor: t }],
        &[],
        &RequestOptions::default(),
    )
    .unwrap()
}

/// Polls `f` until it holds or `deadline` passes.
async fn until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < deadline, "{what}: not within {deadline:?}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn pending_gauge(gw: &Gateway) -> String {
    gw.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("osprey_pending_requests{"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_releases_its_count_and_drain_completes() {
    let gw = gateway();
    let f = fake(&gw, "fake", 1);
    // The first request's batch is held by the fake agent; its client gives up.
    let r = digits_request(&gw, "");
    let gone = tokio::time::timeout(Duration::from_millis(50), gw.infer(r, 0)).await;
    assert!(gone.is_err(), "the fake agent holds the batch");
    assert_eq!(f.held.lock().unwrap().len(), 1);
    // The worker and backlog slot are taken: a queued request's client gives up too.
    let r = digits_request(&gw, "");
    let _ = tokio::time::timeout(Duration::from_millis(20), gw.infer(r, 0)).await;
    let r = digits_request(&gw, "");
    let _ = tokio::time::timeout(Duration::from_millis(20), gw.infer(r, 0)).await;
    assert_eq!(gw.in_flight(), 0, "a cancelled request must not hold the in-flight count");
    let gauge = pending_gauge(&gw);
    assert!(gauge.contains("model=\"digits\"") && gauge.ends_with(" 0"), "pending gauge leaked: {gauge}");
    // The queued (never batched) one left the dispatcher with its client.
    until("queued request dropped", Duration::from_secs(2), || gw.cluster.outstanding() <= 2).await;
    tokio::time::timeout(Duration::from_secs(2), gw.drain())
        .await
        .expect("drain must not wait for gone clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_agent_drops_is_retried_and_answered() {
    let gw = gateway();
    let f = fake(&gw, "fake", 1);
    let task = {
        let gw = gw.clone();
        tokio::spawn(async move {
            let r = digits_request(&gw, "small");
            gw.infer(r, 0).await
        })
    };
    until("batch held", Duration::from_secs(2), || !f.held.lock().unwrap().is_empty()).await;
    // The agent loses it (its completer is dropped unused): the dispatcher fails it over.
    drop(f.take());
    until("retried", Duration::from_secs(2), || !f.held.lock().unwrap().is_empty()).await;
    assert_eq!(f.run_held(), 1);
    let out = task.await.unwrap().expect("answered after the retry");
    assert_eq!(&*out.node, "fake");
    assert_eq!(out.model.variants[out.variant].spec.name, "small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_error_answers_every_member_once_without_retry() {
    let gw = gateway();
    let f = fake(&gw, "fake", 1);
    let task = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.infer(digits_request(&gw, "small"), 0).await })
    };
    until("batch held", Duration::from_secs(2), || !f.held.lock().unwrap().is_empty()).await;
    for (_, done) in f.take() {
        done.complete(Err(Failure::Engine(osprey_core::error::Error::internal("boom"))));
    }
    let e = task.await.unwrap().unwrap_err();
    assert!(e.message.contains("boom"), "{e:?}");
    assert!(f.held.lock().unwrap().is_empty(), "an engine error is not retried");
    assert_eq!(gw.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_a_host() {
    let gw = gateway();
    assert!(!gw.is_ready(), "no agent hosts anything yet");
    assert!(!gw.model_is_ready("digits"));
    let _f = fake(&gw, "fake", 1);
    assert!(gw.is_ready());
    assert!(gw.model_is_ready("digits"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_dropped_and_told_to_reconnect() {
    let gw = gateway();
    let f = Arc::new(FakeAgent::new("quiet"));
    let agent: Arc<dyn Agent> = f.clone();
    let info = NodeInfo { heartbeats: true, ..NodeInfo::local("quiet", 1) };
    gw.cluster.join(info, agent, 1);
    assert_eq!(gw.cluster.status().len(), 1);
    // It never heartbeats: after DEAD_AFTER the timer (no polling interval) drops it and the
    // agent is told to close its connection, so a live agent reconnects instead of lingering.
    until("node dropped", Duration::from_secs(5), || gw.cluster.status().is_empty()).await;
    until("disconnect sent", Duration::from_secs(1), || f.disconnected.lock().unwrap().is_some()).await;
    assert!(f.disconnected.lock().unwrap().as_deref().unwrap_or("").contains("missed heartbeats"));
    assert!(!gw.is_ready());
}
