//! End-to-end tests of `osprey serve` as a real process on loopback: protocol conformance
//! with the official Python `tritonclient`, the load generator's accounting, and a clean
//! drain on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Server {
    child: Child,
    http: String,
    grpc: String,
}

impl Server {
    /// Starts `osprey serve` on ephemeral ports and waits (with a deadline) for its ready line.
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_osprey"))
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .current_dir(repo_root())
            .env("OSPREY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn osprey serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ready ") {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("osprey serve did not become ready");
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(String::from))
                .expect("address in ready line")
        };
        Server {
            http: field("http"),
            grpc: field("grpc"),
            child,
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "osprey serve did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tritonclient_conformance_over_http_and_grpc() {
    let server = Server::start(&[]);
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/conformance.py"))
        .args(["--http", &server.http, "--grpc", &server.grpc, "--models"])
        .arg(repo_root().join("models"))
        .output()
        .expect("run python3 (install it and `pip install tritonclient[http,grpc] numpy`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "conformance failed:\n{text}");
    assert!(text.contains("checks passed"), "{text}");
    let status = server.stop();
    assert!(status.success(), "osprey serve exited with {status}");
}

fn loadgen(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_osprey"))
        .arg("loadgen")
        .args(args)
        .arg("--json")
        .current_dir(repo_root())
        .output()
        .expect("run osprey loadgen");
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
            assert_eq!(
                n("sent"),
                n("ok") + n("rejected") + n("failed") + n("lost"),
                "{r}"
            );
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
    for f in [
        "model.toml",
        "small.onnx",
        "medium.onnx",
        "large.onnx",
        "eval/inputs.bin",
        "eval/labels.csv",
    ] {
        std::fs::copy(src.join(f), dir.join("digits").join(f)).unwrap();
    }
    let server = Server::start(&["--model-repository", dir.to_str().unwrap()]);
    let body = http_get(&server.http, "/v2/models/digits");
    assert!(body.contains("\"versions\""), "{body}");
    let idx = http_post(&server.http, "/v2/repository/index", "{}");
    assert!(
        idx.contains("\"broken\"") && idx.contains("UNAVAILABLE") && idx.contains("bogus"),
        "{idx}"
    );
    assert!(server.stop().success());
}

fn http(addr: &str, req: String) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn http_get(addr: &str, path: &str) -> String {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

fn http_post(addr: &str, path: &str, body: &str) -> String {
    http(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}
