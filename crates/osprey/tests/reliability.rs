//! Reliability of `osprey serve` as a real process: bad input over both protocols, graceful
//! shutdown with requests in flight and clients that hang up, and overload at three times
//! capacity. The longer variants are `bench/reliability.sh`.

mod common;

use common::{Server, http, repo_root, rss_mb};
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
    // queue. The grace is far above what the queue needs (about 3 s idle, several times that on a
    // busy machine, where the emulated wait scales with the measured compute): a keeper cut
    // off by the grace would read as a lost request.
    const DRAIN: Duration = Duration::from_secs(60);
    let config = write_config(
        "drain",
        &format!(
            "max_batch = 1\n\n[limits]\ndefault_timeout_ms = 20000\ndrain_timeout_ms = {}\n\n[[tenants]]\nname = \"t\"\nlatency_slo_ms = 20000\n\n[[agents]]\nname = \"slow\"\nthreads = 1\nspeed = 0.001\n",
            DRAIN.as_millis()
        ),
    );
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let addr = server.http.clone();
    let keepers: Vec<_> = (0..6)
        .map(|_| {
            let (addr, req) = (addr.clone(), image_request(""));
            std::thread::spawn(move || status_of(&addr, &req))
        })
        .collect();
    // Every keeper is admitted before anything else is sent: counted together with the
    // hang-ups below, six pending requests could leave a slow-starting keeper unsent when the
    // signal comes (seen on a busy machine).
    let t = Instant::now();
    while pending(&addr) < 6 {
        assert!(t.elapsed() < Duration::from_secs(20), "requests never became pending");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Clients that hang up right after sending, queued behind the keepers.
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(image_request("").as_bytes()).unwrap();
        drop(s);
    }
    let pid = server.child.id().to_string();
    let stop_at = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // New requests are refused (the listener is closed, or 503 while draining). One sent
    // before the server has handled the signal may still be admitted, and then waits its turn
    // behind the slow queue; what must not happen is a request *sent* 2 s after the signal
    // being admitted.
    let t = Instant::now();
    loop {
        let sent = t.elapsed();
        let s = status_of(&addr, &image_request(""));
        if s == 0 || s == 503 {
            break;
        }
        assert!(
            sent < Duration::from_secs(2),
            "a request sent {sent:?} after SIGTERM was admitted (status {s})"
        );
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
            stop_at.elapsed() < DRAIN * 2 + Duration::from_secs(2),
            "osprey serve did not exit within its grace period"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    eprintln!("drained {} in-flight requests in {:?}", statuses.len(), stop_at.elapsed());
}

fn loadgen(http: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_osprey"))
        .args(["loadgen", "--model", "spoken_digits", "--version", "large", "--target", http, "--json"])
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run osprey loadgen");
    assert!(out.status.success(), "loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default())
        .expect("JSON")
}

/// Three times capacity: goodput holds, the excess is refused at once (nothing waits out its
/// deadline), no answer is lost or duplicated, and memory returns after the load. CI runs it
/// for a few seconds; `bench/reliability.sh` for minutes.
#[test]
fn three_times_capacity_keeps_goodput_and_refuses_the_excess_at_once() {
    let secs: f64 = std::env::var("OSPREY_OVERLOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(6.0);
    // One engine thread on an emulated node a tenth of this machine's speed (it waits out the
    // difference instead of computing), so that capacity is set by the node and the debug
    // build's request path and the load generator have the CPU to show the overload policy.
    // OSPREY_OVERLOAD_SPEED=1 with a release build is the real thing (bench/reliability.sh).
    let speed = std::env::var("OSPREY_OVERLOAD_SPEED").unwrap_or_else(|_| "0.1".into());
    let config =
        write_config("overload", &format!("[[agents]]\nname = \"edge\"\nthreads = 1\nspeed = {speed}\n"));
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let pid = server.child.id();
    let idle = rss_mb(pid);
    let cap = loadgen(&server.http, &["--concurrency", "32", "--duration", "3"]);
    let capacity = cap["throughput_rps"].as_f64().unwrap();
    // A floor that only says the server answers at a rate worth overloading: the figure is the
    // emulated node's, and a busy CI machine has measured 48/s where an idle one measures 60.
    assert!(capacity > 20.0, "{cap}");
    let rate = format!("{:.0}", 3.0 * capacity);
    let series = std::env::temp_dir().join(format!("osprey-overload-{}.csv", std::process::id()));
    let r = loadgen(
        &server.http,
        &["--rate", &rate, "--duration", &secs.to_string(), "--timeseries", series.to_str().unwrap()],
    );
    let n = |k: &str| r[k].as_u64().unwrap_or(u64::MAX);
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    eprintln!("capacity {capacity:.0}/s; at {rate}/s: {r}");
    assert_eq!(n("sent"), n("ok") + n("rejected") + n("failed") + n("lost"), "{r}");
    assert_eq!((n("lost"), n("failed"), n("duplicates")), (0, 0, 0), "{r}");
    assert_eq!(n("expired"), 0, "nothing is left to expire in the queue: {r}");
    // Capacity is measured in its own 3 s phase; on a busy machine the two phases differ by a
    // few percent (45.5 against 48 was seen), so the bound leaves 10%. bench/reliability.sh
    // measures the release figure.
    assert!(
        f("goodput_rps") >= 0.9 * capacity,
        "goodput {} below 0.9 x {capacity:.0}: {r}",
        f("goodput_rps")
    );
    assert!(f("p99_ms") < 5000.0, "admitted p99 within the 5 s objective: {r}");
    // Refusals come back at once. The 1 ms goal is measured on a release build by
    // bench/reliability.sh (p50 0.15, p99 0.48 ms); here the debug build shares the machine
    // with the other tests of this file (a p50 of 1.3 ms was seen), so the bound is looser
    // while still far from the seconds that queued-then-expired refusals took.
    assert!(f("reject_p50_ms") < 5.0 && f("reject_p99_ms") < 25.0, "{r}");
    let csv = std::fs::read_to_string(&series).unwrap();
    assert!(csv.lines().count() as f64 >= secs, "one row per second: {csv}");
    let _ = std::fs::remove_file(&series);
    // Memory goes back near its idle level once the load is over.
    let t = Instant::now();
    while rss_mb(pid) > idle + 40.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "RSS {} MB, idle {idle} MB", rss_mb(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.stop().success());
}
