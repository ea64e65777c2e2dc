//! Reliability of `osprey serve` as a real process: bad input over both protocols, graceful
//! shutdown with requests in flight and clients that hang up, and overload at three times
//! capacity. The longer variants are `bench/reliability.sh`.

mod common;

use common::{Server, http, repo_root};
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("osprey.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn hash(k: &str) -> String {
    osprey_server::tenants::hash_key(k)
}

#[test]
fn hundreds_of_malformed_requests_are_refused_and_the_server_stays_healthy() {
    let config = write_config(
        "malformed",
        &format!(
            "[[tenants]]\nname = \"a\"\napi_keys = [\"{}\"]\n\n[[tenants]]\nname = \"lim\"\napi_keys = [\"{}\"]\nmodels = [\"spoken_digits\"]\n\n[[tenants]]\nname = \"ops\"\napi_keys = [\"{}\"]\nrole = \"monitor\"\nmodels = [\"none\"]\n",
            hash("key-a"),
            hash("key-lim"),
            hash("key-ops")
        ),
    );
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/malformed.py"))
        .args(["--http", &server.http, "--grpc", &server.grpc])
        .args(["--key", "key-a", "--limited-key", "key-lim", "--monitor-key", "key-ops"])
        .output()
        .expect("run python3 (install it and `pip install tritonclient[http,grpc] numpy`)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "malformed suite failed:\n{text}");
    let n: usize = text
        .split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .find(|(_, w)| *w == "malformed")
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0);
    assert!(n >= 200, "at least 200 bad inputs tried: {text}");
    eprintln!("{}", text.trim());
    assert!(server.stop().success());
}

/// Sends one request on a fresh connection and returns the status (0 when the connection
/// was refused or closed without an answer).
fn status_of(addr: &str, req: &str) -> u16 {
    let resp = match std::net::TcpStream::connect(addr) {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = s.write_all(req.as_bytes());
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        }
        Err(_) => String::new(),
    };
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn image_request(extra_params: &str) -> String {
    let body = format!(
        r#"{{"inputs":[{{"name":"image","shape":[1,8,8],"datatype":"FP32","data":[{}]}}],"parameters":{{"deadline_ms":20000{extra_params}}}}}"#,
        vec!["0.5"; 64].join(",")
    );
    format!(
        "POST /v2/models/digits/versions/large/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn pending(addr: &str) -> u64 {
    let m = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into());
    m.lines()
        .filter(|l| l.starts_with("osprey_pending_requests{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

#[test]
fn sigterm_with_requests_in_flight_finishes_them_refuses_new_ones_and_exits_in_time() {
    // One slow node, one request per batch (each takes ~0.3 ms / 0.001 ≈ 300 ms): requests
    // queue.
    let config = write_config(
        "drain",
        "max_batch = 1\n\n[limits]\ndefault_timeout_ms = 20000\n\n[[tenants]]\nname = \"t\"\nlatency_slo_ms = 20000\n\n[[agents]]\nname = \"slow\"\nthreads = 1\nspeed = 0.001\n",
    );
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let addr = server.http.clone();
    let keepers: Vec<_> = (0..6)
        .map(|_| {
            let (addr, req) = (addr.clone(), image_request(""));
            std::thread::spawn(move || status_of(&addr, &req))
        })
        .collect();
    // Clients that hang up right after sending, queued among the others.
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(image_request("").as_bytes()).unwrap();
        drop(s);
    }
    let t = Instant::now();
    while pending(&addr) < 6 {
        assert!(t.elapsed() < Duration::from_secs(20), "requests never became pending");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = server.child.id().to_string();
    let stop_at = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // New requests are refused (the listener is closed, or 503 while draining).
    let t = Instant::now();
    loop {
        let s = status_of(&addr, &image_request(""));
        if s == 0 || s == 503 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "a new request was still admitted (status {s})");
        std::thread::sleep(Duration::from_millis(5));
    }
    let statuses: Vec<u16> = keepers.into_iter().map(|k| k.join().unwrap()).collect();
    assert!(statuses.iter().all(|&s| s == 200), "every admitted request finishes: {statuses:?}");
    let mut server = server;
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            stop_at.elapsed() < osprey_server::server::DRAIN_GRACE * 2 + Duration::from_secs(2),
            "osprey serve did not exit within its grace period"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    eprintln!("drained {} in-flight requests in {:?}", statuses.len(), stop_at.elapsed());
}
