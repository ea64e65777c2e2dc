//! Helpers shared by the end-to-end tests: `osprey` processes on loopback and raw HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The join token every spawned gateway and agent shares (through `OSPREY_JOIN_TOKEN`).
pub const TEST_JOIN_TOKEN: &str = "osprey-test-join-token-0123456789";

/// Copies a folder recursively (test repositories built from the zoo).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Spawns `osprey ARGS` in the repository root and waits (with a deadline) for a stdout line
/// starting with `prefix`; returns the process and the rest of that line.
pub fn spawn_until(args: &[&str], prefix: &'static str, within: Duration) -> (Child, String) {
    spawn_with_env(args, &[("OSPREY_JOIN_TOKEN", Some(TEST_JOIN_TOKEN))], prefix, within)
}

/// [`spawn_until`] with environment changes (`None` removes a variable).
pub fn spawn_with_env(
    args: &[&str],
    env: &[(&str, Option<&str>)],
    prefix: &'static str,
    within: Duration,
) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_osprey"));
    cmd.args(args).current_dir(repo_root()).env("OSPREY_LOG", "warn");
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn osprey");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    match rx.recv_timeout(within) {
        Ok(rest) => (child, rest),
        Err(_) => {
            let _ = child.kill();
            panic!("osprey {args:?} printed no '{prefix}' line within {within:?}");
        }
    }
}

/// Resident memory of process `pid`, MB (0 when unknown).
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

pub struct Server {
    pub child: Child,
    pub http: String,
    pub grpc: String,
}

impl Server {
    /// Starts `osprey serve` on ephemeral ports and waits (with a deadline) for its ready line.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[("OSPREY_JOIN_TOKEN", Some(TEST_JOIN_TOKEN))])
    }

    /// [`Server::start`] with environment changes (`None` removes a variable).
    pub fn start_with_env(extra: &[&str], env: &[(&str, Option<&str>)]) -> Server {
        let mut args = vec!["serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let (child, line) = spawn_with_env(&args, env, "ready ", Duration::from_secs(120));
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(String::from))
                .expect("address in ready line")
        };
        Server { http: field("http"), grpc: field("grpc"), child }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "osprey serve did not exit after SIGTERM");
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

pub fn http(addr: &str, req: String) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

pub fn http_get(addr: &str, path: &str) -> String {
    http(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
}

pub fn http_post(addr: &str, path: &str, body: &str) -> String {
    http(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// POST with an optional bearer key; returns (status, body).
pub fn post_as(addr: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let resp = http(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    let status = resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
