//! Multi-process cluster tests on loopback: a gateway and three `osprey agent` processes of
//! different speeds. Kill one under load, slow one, restart one.

mod common;

use common::{Server, http_get, repo_root, rss_mb, spawn_until};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Agent {
    child: Child,
}

impl Agent {
    /// Starts an agent and waits (with a deadline) until the gateway welcomes it.
    fn start(grpc: &str, name: &str, extra: &[&str]) -> Agent {
        let mut args = vec!["agent", "--join", grpc, "--name", name, "--threads", "1"];
        args.extend_from_slice(extra);
        let (child, _) = spawn_until(&args, "joined ", Duration::from_secs(60));
        Agent { child }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /v2/cluster` as JSON.
fn cluster(http: &str) -> serde_json::Value {
    let resp = http_get(http, "/v2/cluster");
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_default()
}

fn nodes(http: &str) -> Vec<(String, bool)> {
    cluster(http)["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| (n["name"].as_str().unwrap_or("").to_string(), n["up"].as_bool().unwrap_or(false)))
        .collect()
}

fn wait_for(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < deadline, "{what}: not within {deadline:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

fn loadgen(http: &str, secs: &str) -> std::thread::JoinHandle<serde_json::Value> {
    loadgen_at(http, secs, "6")
}

fn loadgen_at(http: &str, secs: &str, concurrency: &str) -> std::thread::JoinHandle<serde_json::Value> {
    let http = http.to_string();
    let secs = secs.to_string();
    let concurrency = concurrency.to_string();
    std::thread::spawn(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_osprey"))
            .args([
                "loadgen",
                "--model",
                "digits",
                "--target",
                &http,
                "--concurrency",
                &concurrency,
                "--duration",
                &secs,
            ])
            .args(["--json", "--timeout", "20"])
            .current_dir(repo_root())
            .output()
            .expect("loadgen");
        let s = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(s.lines().last().unwrap_or_default()).expect("loadgen JSON")
    })
}

#[test]
fn kill_slow_and_restart_agents_under_load() {
    let gw = Server::start(&["--local-agents", "0"]);
    let a = Agent::start(&gw.grpc, "a", &[]);
    let _b = Agent::start(&gw.grpc, "b", &[]);
    let _c = Agent::start(&gw.grpc, "c", &["--slowdown", "8"]);
    wait_for("three nodes registered", Duration::from_secs(10), || nodes(&gw.http).len() == 3);

    // Kill `a` with SIGKILL in the middle of a load run.
    let run = loadgen(&gw.http, "4");
    std::thread::sleep(Duration::from_millis(1500));
    a.kill();
    let moved = wait_for("the dead node leaves the cluster", Duration::from_secs(2), || {
        !nodes(&gw.http).iter().any(|(n, up)| n == "a" && *up)
    });
    let r = run.join().unwrap();
    let n = |k: &str| r[k].as_u64().unwrap_or(u64::MAX);
    assert!(n("ok") > 0, "{r}");
    assert_eq!(n("lost"), 0, "every request answered or explicitly failed: {r}");
    assert_eq!(n("sent"), n("ok") + n("rejected") + n("failed") + n("lost"), "{r}");
    eprintln!("node failure detected and traffic moved in {moved:?}; {r}");

    // The slowed node gets less of the traffic than its healthy peer.
    let r = loadgen(&gw.http, "2").join().unwrap();
    let on = |node: &str| r["nodes"][node].as_u64().unwrap_or(0);
    assert!(on("b") > 2 * on("c"), "traffic shifts away from the slow node: {r}");
    assert_eq!(on("a"), 0, "{r}");

    // Restart `a`: it rejoins and receives work again.
    let _a2 = Agent::start(&gw.grpc, "a", &[]);
    wait_for("a rejoins", Duration::from_secs(5), || nodes(&gw.http).iter().any(|(n, up)| n == "a" && *up));
    let r = loadgen(&gw.http, "2").join().unwrap();
    assert!(r["nodes"]["a"].as_u64().unwrap_or(0) > 0, "a receives work after rejoining: {r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert!(gw.stop().success());
}

#[test]
fn agents_attach_only_with_the_join_token() {
    // Zero config: the gateway generates a token into a private file and says how to join.
    let state = std::env::temp_dir().join(format!("osprey-join-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let state_s = state.to_string_lossy().to_string();
    let env = [("OSPREY_JOIN_TOKEN", None), ("OSPREY_STATE_DIR", Some(state_s.as_str()))];
    let gw = Server::start_with_env(&["--local-agents", "0"], &env);
    let file = state.join("join-token");
    let token = std::fs::read_to_string(&file).expect("token file written");
    assert_eq!(token.trim().len(), 64);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

    // No token, a wrong one: refused, and the agent stops with the reason instead of retrying.
    for extra in [vec![], vec!["--token", "not-the-token-0123456789"]] {
        let mut args = vec!["agent", "--join", gw.grpc.as_str(), "--name", "intruder"];
        args.extend(extra.iter().copied());
        let out = Command::new(env!("CARGO_BIN_EXE_osprey"))
            .args(&args)
            .env_remove("OSPREY_JOIN_TOKEN")
            .current_dir(repo_root())
            .output()
            .expect("agent runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("join token"), "{err}");
    }
    assert!(nodes(&gw.http).is_empty(), "nobody attached without the token");

    // The token file joins.
    let file_s = file.to_string_lossy().to_string();
    let (mut ok, _) = common::spawn_with_env(
        &["agent", "--join", &gw.grpc, "--name", "member", "--token-file", &file_s],
        &[("OSPREY_JOIN_TOKEN", None)],
        "joined ",
        Duration::from_secs(60),
    );
    wait_for("member registered", Duration::from_secs(10), || nodes(&gw.http).len() == 1);
    let _ = ok.kill();
    let _ = ok.wait();
    assert!(gw.stop().success());
    let _ = std::fs::remove_dir_all(&state);
}

/// Agents killed (SIGKILL) and restarted in a loop under load: every request is answered or
/// explicitly failed, none lost, none answered twice, and the gateway's memory stays bounded.
/// `OSPREY_CHAOS_SECS` makes it longer (bench/reliability.sh).
#[test]
fn agents_killed_and_restarted_in_a_loop_lose_nothing() {
    let secs: u64 = std::env::var("OSPREY_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let gw = Server::start(&["--local-agents", "0"]);
    let pid = gw.child.id();
    let names = ["c1", "c2", "c3"];
    let mut agents: Vec<Option<Agent>> = names.iter().map(|n| Some(Agent::start(&gw.grpc, n, &[]))).collect();
    wait_for("three nodes registered", Duration::from_secs(20), || nodes(&gw.http).len() == 3);
    let before = rss_mb(pid);
    let run = loadgen_at(&gw.http, &secs.to_string(), "8");
    let t = Instant::now();
    let (mut kills, mut peak) = (0, before);
    let mut k = 0usize;
    while t.elapsed() < Duration::from_secs(secs.saturating_sub(1)) {
        // Kill one, let the others carry the load for a moment, bring it back.
        let i = k % names.len();
        if let Some(a) = agents[i].take() {
            a.kill();
            kills += 1;
        }
        std::thread::sleep(Duration::from_millis(300));
        agents[i] = Some(Agent::start(&gw.grpc, names[i], &[]));
        peak = peak.max(rss_mb(pid));
        k += 1;
    }
    let r = run.join().unwrap();
    let n = |key: &str| r[key].as_u64().unwrap_or(u64::MAX);
    eprintln!("{kills} agent kills in {secs} s; gateway RSS {before:.0} -> peak {peak:.0} MB; {r}");
    assert!(kills >= 3, "{kills}");
    assert!(n("ok") > 0, "{r}");
    assert_eq!(n("sent"), n("ok") + n("rejected") + n("failed") + n("lost"), "{r}");
    assert_eq!((n("lost"), n("duplicates")), (0, 0), "none lost, none twice: {r}");
    assert!(peak < before + 100.0, "gateway memory bounded: {before:.0} -> {peak:.0} MB");
    assert!(gw.stop().success());
}

fn post(http: &str, path: &str, body: &str) -> (u16, String) {
    common::post_as(http, path, None, body)
}

fn instances(http: &str, node: &str) -> Vec<String> {
    cluster(http)["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["name"] == node)
        .flat_map(|n| n["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

/// A repository of the two single-model tasks only (symlinks into the zoo), so that the memory
/// arithmetic of a test does not move when the zoo grows.
fn two_task_repo(tag: &str) -> std::path::PathBuf {
    let repo = std::env::temp_dir().join(format!("osprey-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo).unwrap();
    for m in ["digits", "spoken_digits"] {
        std::os::unix::fs::symlink(repo_root().join("models").join(m), repo.join(m)).unwrap();
    }
    repo
}

#[test]
fn placement_follows_memory_and_unload_waits_for_another_host() {
    let repo = two_task_repo("placement");
    let repo_arg = repo.to_string_lossy().into_owned();
    let gw = Server::start(&["--local-agents", "0", "--model-repository", &repo_arg]);
    // 3 MB: digits small (1) + medium (1) + spoken_digits small (1); the large variants (5 and
    // 9 MB) do not fit.
    let _small = Agent::start(&gw.grpc, "small", &["--memory-mb", "3"]);
    let want = vec!["digits/medium".to_string(), "digits/small".into(), "spoken_digits/small".into()];
    wait_for("variants placed and loaded", Duration::from_secs(20), || instances(&gw.http, "small") == want);
    let image = format!(
        r#"{{"inputs":[{{"name":"image","shape":[1,8,8],"datatype":"FP32","data":[{}]}}]}}"#,
        vec!["0.5"; 64].join(",")
    );
    // Unpinned requests run on what is hosted; a pinned variant nobody hosts is refused at once.
    let (s, b) = post(&gw.http, "/v2/models/digits/infer", &image);
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"variant\":\"medium\""), "{b}");
    let (s, b) = post(&gw.http, "/v2/models/digits/versions/large/infer", &image);
    assert_eq!(s, 503, "{b}");
    assert!(b.contains("no live instance hosts"), "{b}");
    // Loading beyond the node's memory is refused; unloading the only host is refused.
    let (s, b) = post(&gw.http, "/v2/cluster/nodes/small/load", r#"{"model":"digits","variant":"large"}"#);
    assert_eq!(s, 429, "{b}");
    let (s, b) = post(&gw.http, "/v2/cluster/nodes/small/unload", r#"{"model":"digits","variant":"small"}"#);
    assert_eq!(s, 503, "{b}");
    assert!(b.contains("load it on another node before unloading"), "{b}");
    // With a second host, the unload goes through and traffic keeps being answered.
    let _big = Agent::start(&gw.grpc, "big", &["--memory-mb", "4096"]);
    wait_for("big hosts digits/small", Duration::from_secs(20), || {
        instances(&gw.http, "big").contains(&"digits/small".to_string())
    });
    let (s, b) = post(&gw.http, "/v2/cluster/nodes/small/unload", r#"{"model":"digits","variant":"small"}"#);
    assert_eq!(s, 202, "{b}");
    assert!(!instances(&gw.http, "small").contains(&"digits/small".to_string()));
    let (s, b) = post(&gw.http, "/v2/models/digits/versions/small/infer", &image);
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"node\":\"big\""), "{b}");
    assert!(gw.stop().success());
    let _ = std::fs::remove_dir_all(&repo);
}

/// Both listeners and the agent link over TLS (the test CA in tests/fixtures): the official
/// clients connect over HTTPS and gRPC+TLS, an agent joins with `--tls-ca` and answers, and a
/// plaintext request to the TLS port gets nothing.
#[test]
fn tls_on_both_listeners_and_the_agent_link() {
    let fx = repo_root().join("tests/fixtures");
    let dir = std::env::temp_dir().join(format!("osprey-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("osprey.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            fx.join("tls-server.pem").display(),
            fx.join("tls-server.key").display()
        ),
    )
    .unwrap();
    let gw = Server::start(&["--config", config.to_str().unwrap(), "--local-agents", "0"]);
    let ca = fx.join("tls-ca.pem").to_string_lossy().to_string();
    let _agent = Agent::start(&gw.grpc, "secure", &["--tls-ca", &ca]);
    let script = r#"
import json, ssl, sys, urllib.request
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
http, grpc_addr, ca = sys.argv[1:4]
port = http.rsplit(":", 1)[1]
ctx = ssl.create_default_context(cafile=ca)
with urllib.request.urlopen(f"https://localhost:{port}/v2/health/ready", context=ctx, timeout=10) as r:
    assert r.status == 200
c = httpclient.InferenceServerClient(f"localhost:{port}", ssl=True, ssl_options={"ca_certs": ca})
x = np.full((1, 8, 8), 0.5, np.float32)
i = httpclient.InferInput("image", [1, 8, 8], "FP32"); i.set_data_from_numpy(x)
out = c.infer("digits", [i]).as_numpy("probabilities")
assert out.shape == (1, 10), out.shape
g = grpcclient.InferenceServerClient(grpc_addr, ssl=True, root_certificates=ca)
gi = grpcclient.InferInput("image", [1, 8, 8], "FP32"); gi.set_data_from_numpy(x)
r = g.infer("digits", [gi])
assert r.as_numpy("probabilities").shape == (1, 10)
assert r.get_response().parameters["node"].string_param == "secure"
print("tls ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script, &gw.http, &format!("localhost:{}", gw.grpc.rsplit(':').next().unwrap()), &ca])
        .output()
        .expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("tls ok"), "{text}");
    // Plaintext to the TLS port: no HTTP answer.
    let resp = common::http_get(&gw.http, "/v2/health/ready");
    assert!(!resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(gw.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A single model under the control loop (a one-stage pipeline; the random policy, so that
/// decisions move between variants): under load on a node of 7 MB, the variant the loop picks
/// is loaded on demand, the least recently used idle variants are evicted to make room by the
/// memory the node measured at load, the node never holds more than its memory, its replicas
/// are placed on the node within `f_max`, and every request is answered once.
#[test]
fn a_single_model_under_the_control_loop_loads_on_demand_and_evicts_what_is_least_used() {
    let repo = two_task_repo("evict");
    let config = repo.join("osprey.toml");
    std::fs::write(
        &config,
        "[control]\ninterval_s = 1\npolicy = \"random\"\npredictor = \"last\"\nseed = 3\nmodels = [\"digits\"]\n\
         [control.resources]\nf_max = 2\nb_max = 8\nw_max = 4096\ncores_max = 4\n",
    )
    .unwrap();
    let (repo_arg, config_arg) = (repo.to_string_lossy().into_owned(), config.to_string_lossy().into_owned());
    let gw =
        Server::start(&["--local-agents", "0", "--model-repository", &repo_arg, "--config", &config_arg]);
    let _edge = Agent::start(&gw.grpc, "edge", &["--memory-mb", "7"]);
    // Placement as declared: every 1 MB variant (4 MB); the large ones (5 and 9 MB) do not fit.
    let small_ones: Vec<String> =
        ["digits/medium", "digits/small", "spoken_digits/medium", "spoken_digits/small"]
            .map(String::from)
            .to_vec();
    wait_for("the small variants loaded", Duration::from_secs(20), || {
        instances(&gw.http, "edge") == small_ones
    });
    let run = loadgen_at(&gw.http, "8", "4");
    let (mut with_large, mut most_used, mut replicas) = (None, 0u64, Vec::new());
    while !run.is_finished() {
        let node = cluster(&gw.http)["nodes"][0].clone();
        let used = node["memory_used_mb"].as_u64().unwrap_or(u64::MAX);
        most_used = most_used.max(used);
        replicas.extend(node["replicas"]["digits"].as_u64());
        let hosted: Vec<String> = node["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        if with_large.is_none() && hosted.contains(&"digits/large".to_string()) {
            with_large = Some(hosted);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = run.join().unwrap();
    let n = |key: &str| r[key].as_u64().unwrap_or(u64::MAX);
    assert!(n("ok") > 0, "{r}");
    assert_eq!(n("sent"), n("ok") + n("rejected") + n("failed") + n("lost"), "{r}");
    assert_eq!((n("lost"), n("duplicates")), (0, 0), "none lost, none twice: {r}");
    assert!(r["variants"].as_object().is_some_and(|v| v.len() >= 2), "the loop moved variants: {r}");
    assert!(most_used <= 7, "the node held {most_used} MB of 7");
    // Its replicas are placed on the node, within f_max = 2.
    assert!(!replicas.is_empty() && replicas.iter().all(|&q| (1..=2).contains(&q)), "{replicas:?}");
    // digits/large (5 MB declared; never measured before it loaded) took the room of the
    // idle spoken_digits variant loaded first and of a digits variant (which a later decision may
    // load again); both models stay served.
    let hosted = with_large.expect("the loop loaded digits/large on demand");
    let spoken = hosted.iter().filter(|h| h.starts_with("spoken_digits/")).count();
    let digits = hosted.iter().filter(|h| h.starts_with("digits/")).count();
    assert!(digits >= 2 && spoken == 1, "{hosted:?}");
    eprintln!("{r}\nwith digits/large: {hosted:?}; at most {most_used} MB of 7 in use");
    assert!(gw.stop().success());
    let _ = std::fs::remove_dir_all(&repo);
}
