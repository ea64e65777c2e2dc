//! Split inference across agent processes on loopback: MiniLM-L6's layers as contiguous ranges
//! on three agents, activations agent to agent. The split output equals the whole model's; a
//! slowed agent is planned around; a killed one is replaced with nothing lost; untrusted agents
//! never receive token ids or the pinned units' activations (asserted on what they received).

mod common;

use common::{Server, http, http_get, repo_root, spawn_until};
use osprey_engine::split::{RangeInput, SplitGraph, pool};
use osprey_engine::text::TextEncoder;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The two tests start a gateway and agents each; run one at a time, so that neither profiles
/// its agents while the other loads the machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Agent {
    child: Child,
}

impl Agent {
    fn start(grpc: &str, name: &str, extra: &[&str]) -> Agent {
        let mut args =
            vec!["agent", "--join", grpc, "--name", name, "--threads", "1", "--peer-listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let (child, _) = spawn_until(&args, "joined ", Duration::from_secs(60));
        Agent { child }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A repository holding only the split model (so that agents load no zoo variants).
fn split_repo(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-split-repo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(repo_root().join("models/minilm"), dir.join("minilm")).unwrap();
    dir
}

fn split_status(addr: &str) -> serde_json::Value {
    let resp = http_get(addr, "/v2/cluster");
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["splits"][0].clone()
}

/// The current plan as (node, "start..end").
fn stages(s: &serde_json::Value) -> Vec<(String, String)> {
    s["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| (st[0].as_str().unwrap_or("").to_string(), st[1].as_str().unwrap_or("").to_string()))
        .collect()
}

fn received(s: &serde_json::Value, node: &str) -> Vec<(u32, u64)> {
    s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["name"] == node)
        .flat_map(|n| n["received"].as_object().cloned().unwrap_or_default())
        .map(|(k, v)| (k.parse().unwrap_or(u32::MAX), v.as_u64().unwrap_or(0)))
        .collect()
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// Embeds sentences over HTTP; returns (status, embeddings, body).
fn embed(addr: &str, texts: &[&str]) -> (u16, Vec<Vec<f32>>, String) {
    let body = serde_json::json!({
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [texts.len()], "data": texts}],
        "parameters": {"timeout": 20_000_000u64},
    })
    .to_string();
    let resp = http(
        addr,
        format!(
            "POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    let code = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let flat: Vec<f32> = v["outputs"][0]["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
        .collect();
    (code, flat.chunks(384).map(<[f32]>::to_vec).collect(), body)
}

#[test]
fn minilm_split_over_agents_equals_the_whole_model_and_survives_a_slow_and_a_killed_agent() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let repo = split_repo("faults");
    let repo_s = repo.to_string_lossy().to_string();
    let gw = Server::start(&["--local-agents", "0"]);
    // The trusted agent has room for the embedding and one layer (each layer's plan takes about
    // 7.3 MB here): the pinned units (0..2) and no more.
    let a = Agent::start(
        &gw.grpc,
        "a",
        &["--model-repository", &repo_s, "--label", "zone=trusted", "--memory-mb", "10"],
    );
    let b = Agent::start(&gw.grpc, "b", &["--model-repository", &repo_s]);
    let c = Agent::start(&gw.grpc, "c", &["--model-repository", &repo_s]);
    wait_for("a plan over the three profiled agents", Duration::from_secs(60), || {
        let s = split_status(&gw.http);
        let profiled =
            s["nodes"].as_array().is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["profiled"] == true));
        profiled && stages(&s).first().is_some_and(|(n, r)| n == "a" && r == "0..2") && s["pending"].is_null()
    });
    let first = stages(&split_status(&gw.http));
    assert!(first.len() >= 2 && first[1..].iter().all(|(n, _)| n != "a"), "{first:?}");

    // The split output equals the whole model's, bit for bit, on the held-out sentences.
    let dir = repo_root().join("models/minilm");
    let mut boundaries = vec!["node_layer_norm".to_string()];
    boundaries.extend((1..=6).map(|i| format!("node_layer_norm_{}", 2 * i)));
    let whole = SplitGraph::open(&dir.join("model.onnx"), &boundaries, 32, 384).unwrap().range(0..7).unwrap();
    let encoder = TextEncoder::load(&dir.join("tokenizer.json"), 32).unwrap();
    let text = std::fs::read_to_string(dir.join("eval/sentences.txt")).unwrap();
    let sentences: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for chunk in sentences.chunks(8) {
        let (code, got, body) = embed(&gw.http, chunk);
        assert_eq!(code, 200, "{body}");
        for (s, g) in chunk.iter().zip(&got) {
            let e = encoder.encode(s).unwrap();
            let h = whole.run(RangeInput::Tokens { ids: &e.ids, mask: &e.mask }).unwrap();
            assert_eq!(&pool(&h, &e.mask, 384), g, "split differs from the whole model on {s:?}");
        }
    }

    // Load from three client threads for the rest of the test (bounded by count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let (addr, stop, ok, bad) = (gw.http.clone(), stop.clone(), ok.clone(), bad.clone());
            std::thread::spawn(move || {
                let t = Instant::now();
                for k in 0..4000 {
                    if stop.load(Ordering::Relaxed) || t.elapsed() > Duration::from_secs(90) {
                        break;
                    }
                    let s = format!("request {k} from client {i}: the conveyor on line {} stopped", k % 7);
                    let (code, got, body) = embed(&addr, &[&s]);
                    if code == 200 && got.len() == 1 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        bad.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request failed: {code} {body}");
                    }
                }
            })
        })
        .collect();

    // Slow the untrusted agent with the most units three times: the plan moves units away.
    let units_of = |st: &[(String, String)], node: &str| -> usize {
        st.iter()
            .filter(|(n, _)| n == node)
            .filter_map(|(_, r)| {
                r.split_once("..")
                    .and_then(|(a, b)| Some(b.parse::<usize>().ok()? - a.parse::<usize>().ok()?))
            })
            .sum()
    };
    let holder = if units_of(&first, "b") >= units_of(&first, "c") { "b" } else { "c" };
    let (slowed, spare) = if holder == "b" { (&b, "c") } else { (&c, "b") };
    let slowed_pid = slowed.child.id();
    let before = units_of(&first, holder);
    std::thread::sleep(Duration::from_millis(500));
    slowed.signal("-USR1");
    let took = wait_for("a re-split away from the slowed agent", Duration::from_secs(30), || {
        let st = stages(&split_status(&gw.http));
        units_of(&st, holder) < before && units_of(&st, spare) > 0
    });
    eprintln!("re-split {took:?} after a 3x slowdown of {holder}: {:?}", stages(&split_status(&gw.http)));

    // What the untrusted agents received so far: never token ids (0) or unit 1's input.
    wait_for("heartbeats report what the untrusted agents received", Duration::from_secs(5), || {
        let s = split_status(&gw.http);
        !received(&s, "b").is_empty() || !received(&s, "c").is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = split_status(&gw.http);
    for n in ["b", "c"] {
        for (unit, count) in received(&s, n) {
            assert!(unit >= 2, "untrusted agent {n} received {count} inputs of unit {unit}");
        }
    }
    assert!(received(&s, "a").iter().all(|(u, _)| *u == 0), "{:?}", received(&s, "a"));

    // Kill the agent now running the untrusted range, under load: the slowed one takes over.
    let (victim, slowed_agent) = if spare == "b" { (b, c) } else { (c, b) };
    assert_eq!(slowed_agent.child.id(), slowed_pid);
    drop(victim);
    wait_for("a plan without the killed agent", Duration::from_secs(30), || {
        let st = stages(&split_status(&gw.http));
        !st.is_empty() && st.iter().all(|(n, _)| n != spare)
    });
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    let s = split_status(&gw.http);
    eprintln!("under load: {ok} answered, {bad} failed; retried {}; plans {}", s["retried"], s["plans"]);
    assert!(ok > 20, "{ok}");
    assert_eq!(bad, 0, "nothing lost across the re-split and the failure");
    for (unit, count) in received(&s, "b").into_iter().chain(received(&s, "c")) {
        assert!(unit >= 2, "an untrusted agent received {count} inputs of unit {unit}");
    }
    drop(a);
    drop(slowed_agent);
    assert!(gw.stop().success());
    let _ = std::fs::remove_dir_all(&repo);
}

/// The split model through tritonclient, over HTTP (binary and JSON BYTES) and gRPC.
#[test]
fn tritonclient_sends_bytes_to_a_split_model_over_http_and_grpc() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let repo = split_repo("client");
    let repo_s = repo.to_string_lossy().to_string();
    let gw = Server::start(&["--local-agents", "0"]);
    let _a = Agent::start(&gw.grpc, "a", &["--model-repository", &repo_s, "--label", "zone=trusted"]);
    let _b = Agent::start(&gw.grpc, "b", &["--model-repository", &repo_s]);
    wait_for("a split plan", Duration::from_secs(60), || !stages(&split_status(&gw.http)).is_empty());
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/split.py"))
        .args(["--http", &gw.http, "--grpc", &gw.grpc])
        .output()
        .expect("run python3 (install it and `pip install tritonclient[http,grpc] numpy`)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "split checks failed:\n{text}");
    assert!(text.contains("checks passed"), "{text}");
    // Pin every unit to the trusted zone at run time: the plan moves wholly onto `a`.
    let resp = common::http_post(&gw.http, "/v2/cluster/splits/minilm/privacy", r#"{"private_units": 7}"#);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    wait_for("a plan on the trusted agent only", Duration::from_secs(20), || {
        stages(&split_status(&gw.http)) == [("a".to_string(), "0..7".to_string())]
    });
    let (code, got, body) = embed(&gw.http, &["The welding station needs new gas cylinders."]);
    assert!(code == 200 && got.len() == 1, "{body}");
    let resp = common::http_post(&gw.http, "/v2/cluster/splits/minilm/privacy", r#"{"private_units": 9}"#);
    assert!(resp.starts_with("HTTP/1.1 400"), "a pin beyond the model's units is refused: {resp}");
    drop((_a, _b));
    assert!(gw.stop().success());
    let _ = std::fs::remove_dir_all(&repo);
}

/// Network namespaces joined to the gateway's by veth pairs on a bridge, with each agent's
/// link rate-limited (`tc tbf`; `netem` delay too where the kernel has it). Removed on drop.
struct Netns {
    names: Vec<String>,
    bridge: String,
}

impl Netns {
    /// `None` (with the reason printed) when namespaces cannot be made here.
    fn create(tag: &str, rates: &[&str]) -> Option<Netns> {
        let ip = |args: &[&str]| {
            Command::new("ip").args(args).output().map(|o| o.status.success()).unwrap_or(false)
        };
        let tc = |args: &[&str]| {
            Command::new("tc").args(args).output().map(|o| o.status.success()).unwrap_or(false)
        };
        let bridge = format!("ospbr{tag}");
        if !ip(&["link", "add", &bridge, "type", "bridge"]) {
            eprintln!("skipped: cannot create network namespaces here (needs root and iproute2)");
            return None;
        }
        let mut ns = Netns { names: Vec::new(), bridge: bridge.clone() };
        let ok = ip(&["addr", "add", "10.78.0.1/24", "dev", &bridge]) && ip(&["link", "set", &bridge, "up"]);
        if !ok {
            eprintln!("skipped: cannot configure the bridge");
            return None;
        }
        let netem = tc(&["qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"]);
        if netem {
            tc(&["qdisc", "del", "dev", "lo", "root"]);
        }
        for (i, rate) in rates.iter().enumerate() {
            let name = format!("osp{tag}{i}");
            let veth = format!("ospv{tag}{i}");
            let addr = format!("10.78.0.{}/24", 11 + i);
            let shape = |dev: &str, netns: Option<&str>| {
                let mut a: Vec<&str> = Vec::new();
                if let Some(n) = netns {
                    a.extend(["-n", n]);
                }
                a.extend(["qdisc", "add", "dev", dev, "root"]);
                if netem {
                    a.extend(["netem", "delay", "2ms", "rate", rate]);
                } else {
                    a.extend(["tbf", "rate", rate, "burst", "64kb", "latency", "100ms"]);
                }
                tc(&a)
            };
            let ok = ip(&["netns", "add", &name])
                && {
                    ns.names.push(name.clone());
                    true
                }
                && ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name])
                && ip(&["link", "set", &veth, "master", &bridge, "up"])
                && ip(&["-n", &name, "addr", "add", &addr, "dev", "eth0"])
                && ip(&["-n", &name, "link", "set", "eth0", "up"])
                && ip(&["-n", &name, "link", "set", "lo", "up"])
                && shape("eth0", Some(&name))
                && shape(&veth, None);
            if !ok {
                eprintln!("skipped: cannot set up namespace {name} and its link");
                return None;
            }
        }
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// Spawns `osprey ARGS` (inside `netns` when given) and waits for a stdout line starting with
/// `prefix`; returns the child and the rest of the line.
fn spawn_in(netns: Option<&str>, args: &[&str], prefix: &'static str) -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let bin = env!("CARGO_BIN_EXE_osprey");
    let mut cmd = match netns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n, bin]);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args)
        .current_dir(repo_root())
        .env("OSPREY_LOG", "warn")
        .env("OSPREY_JOIN_TOKEN", common::TEST_JOIN_TOKEN)
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn osprey");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(rest) => (child, rest),
        Err(_) => {
            let _ = child.kill();
            panic!("osprey {args:?} printed no '{prefix}' line");
        }
    }
}

/// Agents in their own network namespaces, activations crossing rate-limited links: the split
/// output still equals the whole model's, and the untrusted agent received only units ≥ 2.
#[test]
fn split_inference_across_network_namespaces_with_limited_links() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tag = format!("{}", std::process::id() % 10_000);
    let Some(ns) = Netns::create(&tag, &["1000mbit", "100mbit"]) else { return };
    let repo = split_repo("netns");
    let repo_s = repo.to_string_lossy().to_string();
    let (gw, line) = spawn_in(
        None,
        &["serve", "--http-addr", "10.78.0.1:0", "--grpc-addr", "10.78.0.1:0", "--local-agents", "0"],
        "ready ",
    );
    let gw = Agent { child: gw };
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(String::from))
            .expect("address")
    };
    let (http_addr, grpc) = (field("http"), field("grpc"));
    let agent = |i: usize, name: &str, extra: &[&str]| {
        let peer = format!("10.78.0.{}:0", 11 + i);
        let mut args = vec![
            "agent",
            "--join",
            &grpc,
            "--name",
            name,
            "--threads",
            "1",
            "--model-repository",
            &repo_s,
            "--peer-listen",
            &peer,
        ];
        args.extend_from_slice(extra);
        Agent { child: spawn_in(Some(&ns.names[i]), &args, "joined ").0 }
    };
    let _a = agent(0, "a", &["--label", "zone=trusted", "--memory-mb", "10"]);
    let _b = agent(1, "b", &[]);
    wait_for("a plan over both namespaces", Duration::from_secs(60), || {
        let st = stages(&split_status(&http_addr));
        st.len() == 2 && st[0] == ("a".to_string(), "0..2".to_string())
    });
    // Both directions are probed (a measures its link to b when b joins, b to a at its profile).
    let bandwidth = |s: &serde_json::Value| {
        let l = |from: usize, to: &str| s["nodes"][from]["links"][to][1].as_f64();
        l(0, "b").into_iter().chain(l(1, "a")).fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))))
    };
    wait_for("the link between the namespaces measured", Duration::from_secs(20), || {
        bandwidth(&split_status(&http_addr)).is_some()
    });
    let s = split_status(&http_addr);
    let link = bandwidth(&s).unwrap_or(0.0);
    eprintln!(
        "measured a <-> b: {} / {} (ms, MB/s)",
        s["nodes"][0]["links"]["b"], s["nodes"][1]["links"]["a"]
    );
    assert!(link > 0.0 && link < 100.0, "a measured bandwidth to b through its 100 Mbit/s link: {link}");
    let dir = repo_root().join("models/minilm");
    let mut boundaries = vec!["node_layer_norm".to_string()];
    boundaries.extend((1..=6).map(|i| format!("node_layer_norm_{}", 2 * i)));
    let whole = SplitGraph::open(&dir.join("model.onnx"), &boundaries, 32, 384).unwrap().range(0..7).unwrap();
    let encoder = TextEncoder::load(&dir.join("tokenizer.json"), 32).unwrap();
    let texts =
        ["The camera at the parking entrance lost its video signal.", "Vibration on pump two increased."];
    let (code, got, body) = embed(&http_addr, &texts);
    assert_eq!(code, 200, "{body}");
    for (t, g) in texts.iter().zip(&got) {
        let e = encoder.encode(t).unwrap();
        let h = whole.run(RangeInput::Tokens { ids: &e.ids, mask: &e.mask }).unwrap();
        assert_eq!(&pool(&h, &e.mask, 384), g);
    }
    wait_for("b's heartbeat reports what it received", Duration::from_secs(5), || {
        !received(&split_status(&http_addr), "b").is_empty()
    });
    for (unit, count) in received(&split_status(&http_addr), "b") {
        assert!(unit >= 2, "the untrusted agent received {count} inputs of unit {unit}");
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&repo);
}
