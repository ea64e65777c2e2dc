//! A short coverage-guided fuzzing run of every target in `fuzz/` (AFL++ through cargo-afl):
//! the JSON, binary and protobuf tensor decoders and the `model.toml` parser must not crash.
//! The long run is `fuzz/run.sh 3600` (figures in bench/RESULTS.md).

use std::process::Command;

#[test]
fn fuzz_targets_survive_a_short_afl_run() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        have("cargo-afl"),
        "the fuzzing smoke test needs cargo-afl: cargo install cargo-afl && cargo afl config --build (.ci/run does it)"
    );
    let secs = std::env::var("OSPREY_FUZZ_SECS").unwrap_or_else(|_| "5".into());
    // Unoptimised targets unless told otherwise: the build dominates a few seconds of fuzzing.
    let profile = std::env::var("OSPREY_FUZZ_PROFILE").unwrap_or_else(|_| "smoke".into());
    let out = Command::new(root.join("fuzz/run.sh"))
        .arg(&secs)
        .env("OSPREY_FUZZ_PROFILE", profile)
        .output()
        .expect("run fuzz/run.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "fuzzing found a crash or could not run:\n{text}");
    for target in ["json_tensor", "http_body", "grpc_request", "model_toml"] {
        let line = text.lines().find(|l| l.starts_with(target)).unwrap_or_default();
        let execs: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(execs > 100, "{target} ran: {line}");
    }
}
