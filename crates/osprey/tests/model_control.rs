//! Triton's model-control API end to end: `--model-control-mode explicit` driven by
//! tritonclient (load, reload under load with nothing lost, unload, the index), a reload that
//! reaches a remote agent, `poll` following a repository folder that changes, and `none`
//! refusing both requests.

mod common;

use common::{Server, copy_dir, http_get, http_post, repo_root, spawn_until};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A repository with the zoo's digits under each of `names`.
fn repository(tag: &str, names: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-control-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for n in names {
        copy_dir(&repo_root().join("models/digits"), &dir.join(n));
    }
    dir
}

fn body(resp: &str) -> &str {
    &resp[resp.find("\r\n\r\n").map_or(0, |i| i + 4)..]
}

fn status(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// `(name, version, state)` of every index entry.
fn index(addr: &str) -> Vec<(String, String, String)> {
    let resp = http_post(addr, "/v2/repository/index", "{}");
    let v: serde_json::Value = serde_json::from_str(body(&resp)).unwrap_or_else(|e| panic!("{e}: {resp}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
            (s("name"), s("version"), s("state"))
        })
        .collect()
}

/// Polls `probe` until `pred` holds on what it returns (deadline 60 s).
fn poll<T: std::fmt::Debug>(what: &str, probe: impl Fn() -> T, pred: impl Fn(&T) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = probe();
        if pred(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {v:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `pred` over the index until it holds.
fn until(addr: &str, what: &str, pred: impl Fn(&[(String, String, String)]) -> bool) {
    poll(what, || index(addr), |i| pred(i));
}

#[test]
fn explicit_mode_loads_reloads_and_unloads_through_tritonclient_with_nothing_lost() {
    let repo = repository("explicit", &["digits", "digits_b"]);
    let server = Server::start(&[
        "--model-repository",
        repo.to_str().unwrap(),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "digits",
    ]);
    // Load on digits throughout: its three reloads must not lose or fail a request.
    let load = Command::new(env!("CARGO_BIN_EXE_osprey"))
        .args(["loadgen", "--model", "digits", "--target", &server.http, "--rate", "150", "--duration", "8"])
        .arg("--json")
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("osprey loadgen");
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/model_control.py"))
        .args(["--http", &server.http, "--grpc", &server.grpc, "--model", "digits", "--other", "digits_b"])
        .output()
        .expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("checks passed"), "{text}");
    let summary = load.wait_with_output().expect("loadgen");
    let line = String::from_utf8_lossy(&summary.stdout);
    let v: serde_json::Value =
        serde_json::from_str(line.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {line}"));
    println!("{text}\nloadgen: {v}");
    assert!(v["ok"].as_u64().unwrap_or(0) > 100, "{v}");
    for k in ["failed", "lost", "duplicates"] {
        assert_eq!(v[k].as_u64(), Some(0), "{k} under reloads: {v}");
    }
    assert!(server.stop().success());
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn poll_mode_follows_the_repository_folder() {
    let repo = repository("poll", &["digits"]);
    let server = Server::start(&[
        "--model-repository",
        repo.to_str().unwrap(),
        "--model-control-mode",
        "poll",
        "--repository-poll-secs",
        "0.2",
    ]);
    let refused = http_post(&server.http, "/v2/repository/models/digits/load", "");
    assert!(status(&refused) >= 400 && body(&refused).contains("polled"), "{refused}");
    let variants = |i: &[(String, String, String)], m: &str| -> Vec<String> {
        i.iter().filter(|e| e.0 == m && e.2 == "READY").map(|e| e.1.clone()).collect()
    };
    // A new folder is loaded.
    copy_dir(&repo_root().join("models/digits"), &repo.join("digits_c"));
    until(&server.http, "digits_c loaded", |i| variants(i, "digits_c").len() == 3);
    // A changed folder is reloaded: its last variant is gone from model.toml.
    let toml = repo.join("digits/model.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let cut = text.rfind("[[variants]]").unwrap();
    std::fs::write(&toml, &text[..cut]).unwrap();
    until(&server.http, "digits reloaded with two variants", |i| variants(i, "digits").len() == 2);
    let meta = http_get(&server.http, "/v2/models/digits");
    assert!(meta.contains("\"small\"") && !meta.contains("\"large\""), "{meta}");
    // A removed folder is unloaded.
    std::fs::remove_dir_all(repo.join("digits_c")).unwrap();
    until(&server.http, "digits_c unloaded", |i| !i.iter().any(|e| e.0 == "digits_c"));
    assert!(http_get(&server.http, "/v2/models/digits_c").contains("unknown model"));
    assert!(server.stop().success());
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn without_model_control_load_and_unload_are_refused_and_say_how() {
    let repo = repository("none", &["digits"]);
    let server = Server::start(&["--model-repository", repo.to_str().unwrap()]);
    for action in ["load", "unload"] {
        let resp = http_post(&server.http, &format!("/v2/repository/models/digits/{action}"), "{}");
        assert!(status(&resp) >= 400 && body(&resp).contains("--model-control-mode explicit"), "{resp}");
    }
    assert!(index(&server.http).iter().any(|e| e.0 == "digits" && e.2 == "READY"));
    assert!(server.stop().success());
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn a_reload_reaches_a_remote_agent_which_rereads_its_copy() {
    let repo = repository("remote", &["digits"]);
    let server = Server::start(&[
        "--model-repository",
        repo.to_str().unwrap(),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
        "--local-agents",
        "0",
    ]);
    let (mut agent, _) = spawn_until(
        &[
            "agent",
            "--join",
            &server.grpc,
            "--name",
            "edge",
            "--threads",
            "1",
            "--model-repository",
            repo.to_str().unwrap(),
        ],
        "joined ",
        Duration::from_secs(60),
    );
    let infer = |version: &str| {
        let path = if version.is_empty() {
            "/v2/models/digits/infer".to_string()
        } else {
            format!("/v2/models/digits/versions/{version}/infer")
        };
        let zeros = vec!["0"; 64].join(",");
        let body = format!(
            r#"{{"inputs":[{{"name":"image","datatype":"FP32","shape":[1,8,8],"data":[{zeros}]}}]}}"#
        );
        http_post(&server.http, &path, &body)
    };
    until(&server.http, "served by the agent", |i| i.iter().any(|e| e.0 == "digits" && e.2 == "READY"));
    poll("the agent answers", || infer("large"), |r| status(r) == 200);
    // The folder changes on the agent's copy (here the same directory): `large` is gone.
    let toml = repo.join("digits/model.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, &text[..text.rfind("[[variants]]").unwrap()]).unwrap();
    let resp = http_post(&server.http, "/v2/repository/models/digits/load", "{}");
    assert_eq!(status(&resp), 200, "{resp}");
    let gone = infer("large");
    assert_eq!(status(&gone), 404, "{gone}");
    poll("the reloaded model answers on the agent", || infer("medium"), |r| status(r) == 200);
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(server.stop().success());
    let _ = std::fs::remove_dir_all(&repo);
}
