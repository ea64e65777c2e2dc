//! End-to-end tests of `osprey serve` as a real process on loopback: protocol conformance
//! with the official Python `tritonclient`, the load generator's accounting, and a clean
//! drain on SIGTERM.

mod common;

use common::{Server, http, http_get, http_post, post_as, repo_root};
use std::process::Command;

#[test]
fn tritonclient_conformance_over_http_and_grpc() {
    let server = Server::start(&[]);
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/conformance.py"))
        .args(["--http", &server.http, "--grpc", &server.grpc, "--models"])
        .arg(repo_root().join("models"))
        .output()
        .expect("run python3 (install it and `pip install tritonclient[http,grpc] numpy`)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "conformance failed:\n{text}");
    assert!(text.contains("checks passed"), "{text}");
    let status = server.stop();
    assert!(status.success(), "osprey serve exited with {status}");
}

/// The zoo's pipeline addressed as one model by tritonclient over both protocols; its answer
/// equals the stage models called one by one with the same variants.
#[test]
fn pipeline_served_as_one_model_to_tritonclient() {
    let server = Server::start(&[]);
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/pipeline.py"))
        .args(["--http", &server.http, "--grpc", &server.grpc, "--models"])
        .arg(repo_root().join("models"))
        .output()
        .expect("run python3 (install it and `pip install tritonclient[http,grpc] numpy`)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pipeline checks failed:\n{text}");
    assert!(text.contains("checks passed"), "{text}");
    assert!(server.stop().success());
}

/// The control loop reconfigures the pipeline every second (the random policy, so that every
/// decision changes something) while tritonclient loads it: every request is answered once,
/// with its own id, and answers come from several configurations.
#[test]
fn pipeline_reconfigured_under_load_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("osprey-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("osprey.toml");
    std::fs::write(
        &config,
        "[control]\ninterval_s = 1\npolicy = \"random\"\npredictor = \"last\"\nseed = 5\n\
         [control.resources]\nf_max = 2\nb_max = 8\nw_max = 4096\ncores_max = 6\n",
    )
    .unwrap();
    let server = Server::start(&["--config", &config.to_string_lossy()]);
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/pipeline_load.py"))
        .args(["--http", &server.http, "--seconds", "6", "--threads", "4", "--models"])
        .arg(repo_root().join("models"))
        .output()
        .expect("run python3 (install it and `pip install tritonclient[http,grpc] numpy`)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["duplicates"], 0, "{v}");
    assert_eq!(
        v["sent"].as_u64().unwrap(),
        v["ok"].as_u64().unwrap() + v["refused"].as_u64().unwrap(),
        "{v}"
    );
    assert!(v["ok"].as_u64().unwrap() > 50, "{v}");
    assert!(v["configurations"].as_array().unwrap().len() >= 2, "one configuration answered everything: {v}");
    let metrics = http_get(&server.http, "/metrics");
    let decisions: f64 = metrics
        .lines()
        .find(|l| l.starts_with("osprey_control_decisions_total{model=\"digits_pipeline\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    assert!(decisions >= 4.0, "control decisions: {decisions}");
    assert!(server.stop().success());
    let _ = std::fs::remove_dir_all(dir);
}

fn loadgen(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_osprey"))
        .arg("loadgen")
        .args(args)
        .arg("--json")
        .current_dir(repo_root())
        .output()
        .expect("run osprey loadgen");
    assert!(out.status.success(), "loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("one JSON line")
}

#[test]
fn loadgen_accounts_for_every_request_on_both_protocols() {
    let server = Server::start(&[]);
    for (proto, target) in [("http", &server.http), ("grpc", &server.grpc)] {
        for mode in [["--concurrency", "4"], ["--rate", "200"]] {
            let r = loadgen(&[
                "--model",
                "digits",
                "--protocol",
                proto,
                "--target",
                target,
                mode[0],
                mode[1],
                "--duration",
                "1",
            ]);
            let n = |k: &str| r[k].as_u64().unwrap_or(u64::MAX);
            assert!(n("sent") > 0, "{r}");
            assert_eq!(n("sent"), n("ok") + n("rejected") + n("failed") + n("lost"), "{r}");
            assert_eq!(n("lost"), 0, "{r}");
            assert_eq!(n("failed"), 0, "{r}");
            // Real inputs from the eval set: answers are right most of the time.
            assert!(r["accuracy"].as_f64().unwrap_or(0.0) > 0.5, "{r}");
            assert!(r["p50_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        }
    }
    // A deadline nothing can meet is refused at once, never lost.
    let r = loadgen(&[
        "--model",
        "spoken_digits",
        "--version",
        "large",
        "--target",
        &server.http,
        "--concurrency",
        "2",
        "--duration",
        "0.5",
        "--deadline-ms",
        "1",
    ]);
    let large_is_slow = r["rejected"].as_u64().unwrap_or(0) > 0;
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert!(large_is_slow || r["ok"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(server.stop().success());
}

#[test]
fn a_broken_model_folder_is_skipped_and_the_others_serve() {
    let dir = std::env::temp_dir().join(format!("osprey-broken-repo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("broken")).unwrap();
    std::fs::write(dir.join("broken/model.toml"), "task = \"x\"\nbogus = 1\n").unwrap();
    let src = repo_root().join("models/digits");
    std::fs::create_dir_all(dir.join("digits/eval")).unwrap();
    for f in ["model.toml", "small.onnx", "medium.onnx", "large.onnx", "eval/inputs.bin", "eval/labels.csv"] {
        std::fs::copy(src.join(f), dir.join("digits").join(f)).unwrap();
    }
    let server = Server::start(&["--model-repository", dir.to_str().unwrap()]);
    let body = http_get(&server.http, "/v2/models/digits");
    assert!(body.contains("\"versions\""), "{body}");
    let idx = http_post(&server.http, "/v2/repository/index", "{}");
    assert!(idx.contains("\"broken\"") && idx.contains("UNAVAILABLE") && idx.contains("bogus"), "{idx}");
    assert!(server.stop().success());
}

fn hash(key: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_osprey")).args(["hash-key", key]).output().expect("hash-key");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn tenants_with_different_objectives_are_answered_by_different_variants() {
    let dir = std::env::temp_dir().join(format!("osprey-tenants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"
[scheduler]
policy = "profiled"

[[tenants]]
name = "realtime"
api_keys = ["{}"]
latency_slo_ms = 1
models = ["spoken_digits"]

[[tenants]]
name = "quality"
api_keys = ["{}"]
latency_slo_ms = 2000
accuracy_floor = 0.9
weight = 2.0
rate = 2.0
burst = 3

[[tenants]]
name = "ops"
api_keys = ["{}"]
role = "monitor"
models = ["none"]
"#,
        hash("rt-key"),
        hash("q-key"),
        hash("ops-key")
    );
    std::fs::write(dir.join("osprey.toml"), config).unwrap();
    let server = Server::start(&["--config", dir.join("osprey.toml").to_str().unwrap()]);
    // One real clip from the evaluation set, as JSON INT16.
    let bytes = std::fs::read(repo_root().join("models/spoken_digits/eval/inputs.bin")).unwrap();
    let samples: Vec<String> =
        bytes[..12800].chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]).to_string()).collect();
    let body = format!(
        r#"{{"inputs":[{{"name":"waveform","shape":[1,6400],"datatype":"INT16","data":[{}]}}]}}"#,
        samples.join(",")
    );
    // The realtime request also names Triton's `timeout` (µs): half a millisecond.
    let rt_body = body.replacen("]}]}", r#"]}],"parameters":{"timeout":500}}"#, 1);
    assert_ne!(rt_body, body);
    let path = "/v2/models/spoken_digits/infer";
    let variant = |b: &str| {
        let v: serde_json::Value = serde_json::from_str(b).unwrap_or_default();
        (v["parameters"]["variant"].as_str().unwrap_or("?").to_string(), v["parameters"]["tenant"].clone())
    };
    // The realtime request's 0.5 ms budget rules out the large variant (~0.8 ms p99 in
    // profile.toml); the quality tenant gets the most accurate one.
    let (s, b) = post_as(&server.http, path, Some("rt-key"), &rt_body);
    assert_eq!(s, 200, "{b}");
    let (rt_variant, rt_tenant) = variant(&b);
    assert_eq!(rt_tenant, "realtime");
    assert_ne!(rt_variant, "large", "{b}");
    let (s, b) = post_as(&server.http, path, Some("q-key"), &body);
    assert_eq!(s, 200, "{b}");
    assert_eq!(variant(&b).0, "large", "{b}");
    // The simulator drives the same policy code: the same two requests (same tenants, same
    // clip, idle cluster) get the same variants there.
    assert_eq!(
        simulated_variants(&["realtime", "quality"], &[0.5, 2000.0]),
        vec![rt_variant.clone(), "large".to_string()]
    );
    // No key, a wrong key, a model the tenant may not use, a quota exceeded.
    assert_eq!(post_as(&server.http, path, None, &body).0, 401);
    assert_eq!(post_as(&server.http, path, Some("nope"), &body).0, 401);
    let (s, b) = post_as(&server.http, "/v2/models/digits/infer", Some("rt-key"), "{}");
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("may not use model 'digits'"), "{b}");
    let statuses: Vec<u16> = (0..4).map(|_| post_as(&server.http, path, Some("q-key"), &body).0).collect();
    assert!(statuses.contains(&429), "burst 3 after one request must run out: {statuses:?}");
    // Health stays open; metadata needs a key.
    assert!(http_get(&server.http, "/v2/health/ready").starts_with("HTTP/1.1 200"));
    assert!(http_get(&server.http, "/v2/models/digits").starts_with("HTTP/1.1 401"));
    // gRPC reads the key from metadata.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use osprey_server::pb;
        let mut c = pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(format!(
            "http://{}",
            server.grpc
        ))
        .await
        .unwrap();
        let e = c
            .model_metadata(pb::ModelMetadataRequest { name: "digits".into(), version: String::new() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut r =
            tonic::Request::new(pb::ModelMetadataRequest { name: "digits".into(), version: String::new() });
        r.metadata_mut().insert("authorization", "Bearer q-key".parse().unwrap());
        assert_eq!(c.model_metadata(r).await.unwrap().into_inner().name, "digits");
        assert!(c.server_live(pb::ServerLiveRequest {}).await.unwrap().into_inner().live);
    });
    drop(rt);
    // Roles: tenants see the models they may use and nothing of the cluster; a monitor reads
    // metrics and the cluster but changes nothing and runs nothing it was not given.
    let get_as = |path: &str, key: &str| {
        http(
            &server.http,
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\r\n"
            ),
        )
    };
    for (path, key, want) in [
        ("/metrics", "q-key", "403"),
        ("/v2/cluster", "rt-key", "403"),
        ("/v2/models/digits", "rt-key", "403"),
        ("/v2/models/digits/stats", "rt-key", "403"),
        ("/v2/models/spoken_digits", "rt-key", "200"),
        ("/v2/cluster", "ops-key", "200"),
        ("/v2/models/digits", "ops-key", "200"),
    ] {
        let resp = get_as(path, key);
        assert!(resp.starts_with(&format!("HTTP/1.1 {want}")), "{key} {path}: {resp}");
        assert!(want == "200" || resp.contains("\"error\""), "{resp}");
    }
    let (s, b) = post_as(&server.http, "/v2/repository/index", Some("rt-key"), "");
    assert!(s == 200 && b.contains("spoken_digits") && !b.contains("\"digits\""), "{b}");
    for key in ["rt-key", "ops-key"] {
        let (s, b) = post_as(
            &server.http,
            "/v2/cluster/nodes/local-0/unload",
            Some(key),
            r#"{"model":"digits","variant":"small"}"#,
        );
        assert_eq!(s, 403, "{key}: {b}");
        assert!(b.contains("admin role"), "{b}");
    }
    assert_eq!(post_as(&server.http, path, Some("ops-key"), &body).0, 403);
    // Per-tenant metrics, for the monitor.
    let (s, m) = {
        let resp = get_as("/metrics", "ops-key");
        (resp.starts_with("HTTP/1.1 200"), resp)
    };
    assert!(
        s && m.contains(
            "osprey_tenant_requests_total{tenant=\"quality\",model=\"spoken_digits\",outcome=\"met\"}"
        ),
        "{m}"
    );
    assert!(m.contains("outcome=\"resource_exhausted\""), "{m}");
    assert!(server.stop().success());
}

/// Runs the simulator on one request per tenant (evaluation sample 0, idle node) with the
/// "profiled" policy and returns the variant that answered each.
fn simulated_variants(tenants: &[&str], slo_ms: &[f64]) -> Vec<String> {
    use osprey_core::config::PolicyName;
    use osprey_sim::engine::{Arrival, ModelContext, simulate};
    use osprey_sim::scenario::Scenario;
    let mut text = String::from(
        "name = \"cross-check\"\nseed = 1\nduration_s = 1\nmodel = \"spoken_digits\"\nmodel_repository = \"models\"\njitter_cv = 0.0\npolicies = [\"profiled\"]\n[[nodes]]\nname = \"n\"\n[workload]\nkind = \"poisson\"\nrate = 1\n",
    );
    for (t, slo) in tenants.iter().zip(slo_ms) {
        text.push_str(&format!("[[tenants]]\nname = \"{t}\"\nlatency_slo_ms = {slo}\n"));
    }
    let scn: Scenario = toml::from_str(&text).expect("scenario");
    let ctx = ModelContext::load(&scn, &repo_root()).expect("model");
    tenants
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let (summary, _) = simulate(
                &scn,
                std::slice::from_ref(&ctx),
                PolicyName::Profiled,
                &[Arrival { t: 0, tenant: i, model: 0, sample: 0 }],
            );
            let v = summary.variants.iter().position(|&n| n == 1).expect("answered once");
            ctx.spec.variants[v].name.clone()
        })
        .collect()
}
