//! The second engine, end to end: models from the wild (`tests/wild/`, built by
//! `scripts/fetch_wild.py`, which `.ci/run` runs) served by `osprey serve` and checked with
//! tritonclient against onnxruntime run directly; a model whose `model.toml` names
//! onnxruntime runs there; without the library, what tract cannot run is reported with the
//! way to fix it and everything else serves.

mod common;

use common::{Server, TEST_JOIN_TOKEN, copy_dir, http_post, repo_root};
use std::path::PathBuf;
use std::process::Command;

/// The onnxruntime library of the installed wheel (or `$OSPREY_ONNXRUNTIME`).
fn library() -> String {
    if let Ok(p) = std::env::var("OSPREY_ONNXRUNTIME") {
        return p;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, glob, os; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[0])",
        ])
        .output()
        .expect("python3");
    assert!(out.status.success(), "pip install onnxruntime: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wild() -> PathBuf {
    let dir = repo_root().join("tests/wild");
    assert!(
        dir.join("magika/model.onnx").exists(),
        "{} is missing: run scripts/fetch_wild.py",
        dir.display()
    );
    dir
}

#[test]
fn models_from_the_wild_are_served_equal_to_onnxruntime_run_directly() {
    // The three wild models, plus the zoo's digits told to run on onnxruntime.
    let dir = std::env::temp_dir().join(format!("osprey-engines-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&wild(), &dir);
    copy_dir(&repo_root().join("models/digits"), &dir.join("digits"));
    let toml = dir.join("digits/model.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("engine = \"onnxruntime\"\n{text}")).unwrap();
    let lib = library();
    let server = Server::start_with_env(
        &["--model-repository", dir.to_str().unwrap(), "--onnxruntime", &lib],
        &[("OSPREY_JOIN_TOKEN", Some(TEST_JOIN_TOKEN)), ("OSPREY_ONNXRUNTIME", None)],
    );
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/wild.py"))
        .args(["--http", &server.http, "--grpc", &server.grpc, "--models", dir.to_str().unwrap()])
        .args(["--engine", "magika=onnxruntime", "--engine", "rapidocr_cls=onnxruntime"])
        .args(["--engine", "sklearn_mlp=tract", "--engine", "digits=onnxruntime"])
        .output()
        .expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success() && text.contains("checks passed"), "{text}");
    assert!(server.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_the_library_what_tract_cannot_run_is_unavailable_with_its_fix_and_the_rest_serves() {
    let server = Server::start_with_env(
        &["--model-repository", wild().to_str().unwrap()],
        &[
            ("OSPREY_JOIN_TOKEN", Some(TEST_JOIN_TOKEN)),
            ("OSPREY_ONNXRUNTIME", None),
            ("ORT_DYLIB_PATH", None),
        ],
    );
    let index = http_post(&server.http, "/v2/repository/index", "{}");
    let body = &index[index.find("\r\n\r\n").map_or(0, |i| i + 4)..];
    let entries: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {index}"));
    let state = |name: &str| {
        entries
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| {
                (
                    e["state"].as_str().unwrap_or("").to_string(),
                    e["reason"].as_str().unwrap_or("").to_string(),
                )
            })
            .unwrap_or_else(|| panic!("{name} not in the index: {body}"))
    };
    assert_eq!(state("sklearn_mlp").0, "READY", "{body}");
    for name in ["magika", "rapidocr_cls"] {
        let (s, reason) = state(name);
        assert_eq!(s, "UNAVAILABLE", "{body}");
        assert!(
            reason.contains("shape input is variable") && reason.contains("OSPREY_ONNXRUNTIME"),
            "{reason}"
        );
    }
    assert!(server.stop().success());
}
