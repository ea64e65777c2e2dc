//! Operations: the dashboard in a real browser, the KServe SDK, the Grafana dashboard's
//! metrics, the Kubernetes manifests and systemd units validated offline, and a binary that
//! stands alone (copied away from the build tree).

mod common;

use common::{Server, TEST_JOIN_TOKEN, http, repo_root};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn hash(k: &str) -> String {
    osprey_server::tenants::hash_key(k)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A configuration with an admin, a monitor and two tenants (keys `admin-key`, `mon-key`,
/// `a-key`, `b-key`), one local agent named `edge`.
fn keyed_config(dir: &Path) -> PathBuf {
    let path = dir.join("osprey.toml");
    let text = format!(
        "[[agents]]\nname = \"edge\"\nthreads = 2\n\n\
         [[tenants]]\nname = \"ops\"\nrole = \"admin\"\napi_keys = [\"{}\"]\n\n\
         [[tenants]]\nname = \"scraper\"\nrole = \"monitor\"\napi_keys = [\"{}\"]\n\n\
         [[tenants]]\nname = \"line-a\"\nlatency_slo_ms = 500\napi_keys = [\"{}\"]\n\n\
         [[tenants]]\nname = \"line-b\"\nlatency_slo_ms = 2000\napi_keys = [\"{}\"]\n",
        hash("admin-key"),
        hash("mon-key"),
        hash("a-key"),
        hash("b-key")
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn get_as(addr: &str, path: &str, auth: Option<&str>) -> (u16, String, String) {
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let resp = http(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"));
    let status = resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (status, head.to_string(), body.to_string())
}

fn basic(user: &str, key: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{key}")))
}

/// Bounded load in the background: `osprey loadgen` as a tenant for `secs` seconds.
fn load(http: &str, key: &str, model: &str, secs: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_osprey"))
        .args(["loadgen", "--model", model, "--target", http, "--rate", "40", "--json"])
        .args(["--duration", &secs.to_string(), "--api-key", key])
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run osprey loadgen")
}

fn python(script: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        .output()
        .expect("run python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn health_routes_answer_with_kserve_bodies_and_the_kserve_sdk_works() {
    let server = Server::start(&[]);
    let (s, _, body) = get_as(&server.http, "/v2/health/live", None);
    assert_eq!((s, body.as_str()), (200, r#"{"live":true}"#));
    let (s, _, body) = get_as(&server.http, "/v2/health/ready", None);
    assert_eq!((s, body.as_str()), (200, r#"{"ready":true}"#));
    let models = repo_root().join("models");
    let (ok, text) = python(
        "kserve_client.py",
        &["--http", &server.http, "--grpc", &server.grpc, "--models", models.to_str().unwrap()],
    );
    assert!(ok, "KServe SDK checks failed (pip install kserve):\n{text}");
    assert!(text.contains("checks passed"), "{text}");
    assert!(server.stop().success());
}

#[test]
fn the_dashboard_needs_the_admin_role_and_reports_the_cluster() {
    let dir = scratch("dashboard-auth");
    let server = Server::start(&["--config", keyed_config(&dir).to_str().unwrap()]);
    // A browser without credentials is asked for them (Basic), an API client gets JSON.
    let (s, head, body) = get_as(&server.http, "/dashboard", None);
    assert_eq!(s, 401, "{body}");
    assert!(head.to_ascii_lowercase().contains("www-authenticate: basic realm=\"osprey\""), "{head}");
    assert_eq!(get_as(&server.http, "/dashboard", Some("Bearer a-key")).0, 403);
    assert_eq!(get_as(&server.http, "/dashboard", Some(&basic("x", "mon-key"))).0, 403);
    assert_eq!(get_as(&server.http, "/v2/dashboard/data", Some("Bearer b-key")).0, 403);
    let (s, head, page) = get_as(&server.http, "/dashboard", Some(&basic("anyone", "admin-key")));
    assert_eq!(s, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: text/html"), "{head}");
    assert!(page.contains("<title>Osprey</title>") && page.contains("/v2/dashboard/data"));
    // A few answers, then the data shows the node, every tenant and the seconds they fell in.
    let mut lg = load(&server.http, "a-key", "digits", 3);
    assert!(lg.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let data = loop {
        let (s, _, body) = get_as(&server.http, "/v2/dashboard/data", Some("Bearer admin-key"));
        assert_eq!(s, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let met: u64 = v["series"]["tenants"]["line-a"]["met"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|x| x.as_u64())
            .sum();
        if met > 0 {
            break v;
        }
        assert!(Instant::now() < deadline, "no answer of line-a in the series: {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(data["nodes"].as_array().unwrap().iter().any(|n| n["name"] == "edge"), "{data}");
    for t in ["ops", "scraper", "line-a", "line-b"] {
        assert!(data["series"]["tenants"][t].is_object(), "{t}: {data}");
    }
    let variants = data["series"]["variants"].as_object().unwrap();
    assert!(variants.keys().any(|k| k.starts_with("digits/")), "{data}");
    let n = data["series"]["t"].as_array().unwrap().len();
    assert!(variants.values().all(|v| v.as_array().unwrap().len() == n), "series aligned: {data}");
    assert!(data["models"].as_array().unwrap().iter().any(|m| m["name"] == "digits"));
    assert!(data["pipelines"].as_array().unwrap().iter().any(|p| p["name"] == "digits_pipeline"));
    assert!(server.stop().success());
}

/// Debian's Chromium, headless, against `osprey serve` under load: the page renders, shows
/// the node and the tenants, and its figures move. The screenshot is kept in
/// `target/test-artifacts/dashboard.png`.
#[test]
fn the_dashboard_renders_and_moves_in_chromium() {
    let have = |b: &str| {
        Command::new("sh").args(["-c", &format!("command -v {b}")]).output().is_ok_and(|o| o.status.success())
    };
    if std::env::var_os("CI").is_none() && !(have("chromium") && have("chromedriver")) {
        eprintln!(
            "skipped: chromium and chromedriver are not installed (apt-get install chromium chromium-driver); CI installs them"
        );
        return;
    }
    let dir = scratch("dashboard-browser");
    let server = Server::start(&["--config", keyed_config(&dir).to_str().unwrap()]);
    let mut a = load(&server.http, "a-key", "digits", 40);
    let mut b = load(&server.http, "b-key", "spoken_digits", 40);
    let shot = repo_root().join("target/test-artifacts/dashboard.png");
    let url = format!("http://{}/dashboard", server.http);
    let (ok, text) = python(
        "dashboard.py",
        &[
            "--url",
            &url,
            "--screenshot",
            shot.to_str().unwrap(),
            "--user",
            "ops",
            "--key",
            "admin-key",
            "--node",
            "edge",
            "--tenant",
            "line-a",
            "--tenant",
            "line-b",
        ],
    );
    let _ = a.kill();
    let _ = b.kill();
    let _ = (a.wait(), b.wait());
    assert!(
        ok,
        "dashboard checks failed (pip install selenium; apt-get install chromium chromium-driver):\n{text}"
    );
    assert!(text.contains("checks passed"), "{text}");
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a real screenshot, {} bytes", png.len());
    eprintln!("{}", text.trim());
    assert!(server.stop().success());
}

/// Every metric the Grafana dashboard queries exists on `/metrics` of a server that has
/// answered requests (histograms by their `_bucket`/`_sum`/`_count`, counters by `_total`).
#[test]
fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let dir = scratch("grafana");
    let server = Server::start(&["--config", keyed_config(&dir).to_str().unwrap()]);
    let mut lg = load(&server.http, "a-key", "digits", 2);
    assert!(lg.wait().unwrap().success());
    // The attainment gauge covers complete seconds: wait for one.
    std::thread::sleep(Duration::from_millis(1100));
    let (s, _, metrics) = get_as(&server.http, "/metrics", Some("Bearer mon-key"));
    assert_eq!(s, 200);
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/grafana/osprey.json")).unwrap(),
    )
    .unwrap();
    let mut names = std::collections::BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("osprey_") {
                let tail = &rest[i..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(names.len() >= 20, "{names:?}");
    // Split models with agents and control loops are not part of this server: their families
    // have no sample here (empty families are not printed), so they must be registered.
    let registered =
        std::fs::read_to_string(repo_root().join("crates/osprey-server/src/metrics.rs")).unwrap();
    let split_only = |n: &str| n.starts_with("osprey_split_") || n.starts_with("osprey_control_");
    for n in &names {
        if split_only(n) {
            let base = n.trim_start_matches("osprey_").trim_end_matches("_bucket").trim_end_matches("_total");
            assert!(registered.contains(&format!("\"{base}\"")), "{n} is not a registered family");
            continue;
        }
        let sample = metrics.lines().any(|l| !l.starts_with('#') && l.starts_with(n.as_str()));
        assert!(sample, "Grafana queries {n}, which /metrics does not have:\n{metrics}");
    }
    assert!(metrics.contains("osprey_node_up{node=\"edge\"} 1"), "{metrics}");
    assert!(metrics.contains("osprey_tenant_slo_attainment{tenant=\"line-a\"}"), "{metrics}");
    assert!(server.stop().success());
}

fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    // PyYAML (a tritonclient and kubernetes-validate dependency) reads the YAML; Rust checks.
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The manifests validate against Kubernetes' own schemas, offline (kubernetes-validate
/// ships them), and say what the binary understands: the ConfigMap's configuration parses, the
/// key files it names are in the Secret, the probes are the OIP health routes, and the agent
/// joins the gateway's Service.
#[test]
fn kubernetes_manifests_validate_offline() {
    let k8s = repo_root().join("deploy/kubernetes");
    let files = ["namespace.yaml", "secret.yaml", "configmap.yaml", "gateway.yaml", "agents.yaml"];
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", "1.31"])
        .args(files.iter().map(|f| k8s.join(f)))
        .output()
        .expect("python3 -m kubernetes_validate (pip install kubernetes-validate)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate:\n{text}");
    // The kustomization lists every manifest.
    let kustomization = std::fs::read_to_string(k8s.join("kustomization.yaml")).unwrap();
    for f in files {
        assert!(kustomization.contains(f), "kustomization.yaml misses {f}");
    }
    let config_map = &yaml_documents(&k8s.join("configmap.yaml"))[0];
    let toml = config_map["data"]["osprey.toml"].as_str().unwrap();
    let mut config = osprey_core::config::ServerConfig::parse(toml, Path::new("configmap.yaml")).unwrap();
    // The Secret's entries, written where the pod mounts them, with real hashes.
    let secret = &yaml_documents(&k8s.join("secret.yaml"))[0];
    let mounted = scratch("secret");
    for (k, v) in secret["stringData"].as_object().unwrap() {
        let v = v.as_str().unwrap();
        let v = if k.starts_with("tenant-") { hash(k) } else { v.to_string() };
        std::fs::write(mounted.join(k), v).unwrap();
    }
    for t in &mut config.tenants {
        let f = t.api_keys_file.as_ref().expect("every tenant's keys come from the Secret");
        let name = f.strip_prefix("/etc/osprey/secrets").expect("mounted at /etc/osprey/secrets");
        t.api_keys_file = Some(mounted.join(name));
    }
    config.read_key_files(Path::new("/")).unwrap();
    assert!(config.tenants.iter().all(|t| t.api_keys.len() == 1), "{:?}", config.tenants);
    // The placeholder is refused, so an unedited Secret cannot start a gateway with a known key.
    std::fs::write(mounted.join("tenant-line-a"), secret["stringData"]["tenant-line-a"].as_str().unwrap())
        .unwrap();
    assert!(config.read_key_files(Path::new("/")).is_err());
    let docs = yaml_documents(&k8s.join("gateway.yaml"));
    let gateway = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let c = &gateway["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/v2/health/live");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/v2/health/ready");
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    let agents = yaml_documents(&k8s.join("agents.yaml"));
    assert_eq!(agents.len(), 2);
    for ds in &agents {
        let args: Vec<&str> = ds["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let join = args[args.iter().position(|a| *a == "--join").unwrap() + 1];
        assert_eq!(join, format!("{}.{}.svc:8001", service["metadata"]["name"].as_str().unwrap(), "osprey"));
        // The agent accepts these flags (clap refuses unknown ones before connecting).
        let probe = Command::new(env!("CARGO_BIN_EXE_osprey"))
            .args(args.iter().map(|a| {
                a.replace("$(NODE_NAME)", "n1")
                    .replace("$(CPU_LIMIT)", "2")
                    .replace("$(MEMORY_LIMIT_MB)", "2048")
                    .replace("$(ZONE)", "trusted")
                    .replace("$(POD_IP)", "127.0.0.1")
            }))
            .arg("--help")
            .output()
            .unwrap();
        assert!(probe.status.success(), "{}", String::from_utf8_lossy(&probe.stderr));
    }
}

/// `systemd-analyze verify` accepts both units (with the binary where they expect it).
#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI installs systemd (systemd-analyze)");
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = scratch("systemd");
    for unit in ["osprey-gateway.service", "osprey-agent.service"] {
        let text = std::fs::read_to_string(repo_root().join("deploy/systemd").join(unit)).unwrap();
        assert!(text.contains("/usr/local/bin/osprey "), "{unit}");
        let text = text.replace("/usr/local/bin/osprey ", &format!("{} ", env!("CARGO_BIN_EXE_osprey")));
        std::fs::write(dir.join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(["osprey-gateway.service", "osprey-agent.service"].map(|u| dir.join(u)))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
}

/// The binary copied out of the build tree serves a repository given on the command line
/// from any directory, and without one says how to give it instead of reaching for a path
/// of the build machine.
#[test]
fn the_binary_stands_alone() {
    let dir = scratch("standalone");
    let bin = dir.join("osprey");
    std::fs::copy(env!("CARGO_BIN_EXE_osprey"), &bin).unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(&bin)
        .args(["serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .current_dir(&empty)
        .env_remove("OSPREY_MODEL_REPOSITORY")
        .env("OSPREY_JOIN_TOKEN", TEST_JOIN_TOKEN)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no model repository: pass --model-repository DIR"), "{err}");
    // A repository of one model, copied away from the checkout.
    let repo = dir.join("repo");
    let src = repo_root().join("models/digits");
    std::fs::create_dir_all(repo.join("digits/eval")).unwrap();
    for f in std::fs::read_dir(&src).unwrap().flatten() {
        if f.path().is_file() {
            std::fs::copy(f.path(), repo.join("digits").join(f.file_name())).unwrap();
        }
    }
    for f in std::fs::read_dir(src.join("eval")).unwrap().flatten() {
        std::fs::copy(f.path(), repo.join("digits/eval").join(f.file_name())).unwrap();
    }
    let mut child = Command::new(&bin)
        .args(["serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--model-repository"])
        .arg(&repo)
        .current_dir("/")
        .env("OSPREY_JOIN_TOKEN", TEST_JOIN_TOKEN)
        .env("OSPREY_STATE_DIR", &dir)
        .env("OSPREY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let http_addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("no ready line within 60 s: {seen:?}")
        });
        if let Some(a) = line.split_whitespace().find_map(|kv| kv.strip_prefix("http=")) {
            break a.to_string();
        }
        seen.push(line);
    };
    let (s, _, body) = get_as(&http_addr, "/v2/models/digits", None);
    assert_eq!(s, 200, "{body}");
    let (s, _, body) = get_as(&http_addr, "/v2/models/spoken_digits", None);
    assert_eq!(s, 404, "only the given repository is served: {body}");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// `osprey bench` writes `report.html` beside `summary.csv`: the table and every plot, each
/// as SVG and PNG.
#[test]
fn bench_writes_a_report_with_its_plots() {
    let out = scratch("bench");
    let run = Command::new(env!("CARGO_BIN_EXE_osprey"))
        .args(["bench", "scenarios/two-models.toml", "--duration", "5", "--out"])
        .arg(&out)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for line in summary.lines().skip(1) {
        let policy = line.split(',').next().unwrap();
        assert!(html.contains(&format!("<td>{policy}</td>")), "{policy} missing from the report");
    }
    for plot in ["late_pct", "accuracy", "cost", "utility", "qos"] {
        assert!(html.contains(&format!("src=\"{plot}.svg\"")), "{plot}");
        let svg = std::fs::read_to_string(out.join(format!("{plot}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<text"), "{plot}.svg");
        let png = std::fs::read(out.join(format!("{plot}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5000, "{plot}.png");
    }
}
