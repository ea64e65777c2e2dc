//! Multi-modal requests end to end: `osprey serve` on the bundled repository (whose
//! `digit_events` pairs the image and the spoken digits), driven by the official Triton clients
//! and by raw HTTP under tenants with different quality objectives.

mod common;

use common::{Server, post_as, repo_root};
use std::process::Command;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-mm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The paired held-out events of `digit_events` and its members' evaluation sets.
fn paired() -> (Vec<osprey_core::multimodal::PairedEvent>, [osprey_core::model::EvalSet; 2]) {
    let models = repo_root().join("models");
    let spec = osprey_core::multimodal::MultiModalSpec::load(&models.join("digit_events")).unwrap();
    let events = spec.load_pairs().unwrap().expect("a paired set");
    let eval =
        |m: &str| osprey_core::model::ModelSpec::load(&models.join(m)).unwrap().load_eval().unwrap().unwrap();
    (events.into_iter().filter(|e| e.held_out).collect(), [eval("digits"), eval("spoken_digits")])
}

/// One paired event (one image and one clip of the same class), as JSON inputs.
fn inputs_of(event: &osprey_core::multimodal::PairedEvent, image: bool, audio: bool) -> Vec<String> {
    let (_, [images, clips]) = paired();
    let mut out = Vec::new();
    if image {
        let px: Vec<String> = images
            .sample(event.samples[0])
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).to_string())
            .collect();
        out.push(format!(
            r#"{{"name":"image","datatype":"FP32","shape":[1,8,8],"data":[{}]}}"#,
            px.join(",")
        ));
    }
    if audio {
        let pcm: Vec<String> = clips
            .sample(event.samples[1])
            .chunks(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]).to_string())
            .collect();
        out.push(format!(
            r#"{{"name":"waveform","datatype":"INT16","shape":[1,6400],"data":[{}]}}"#,
            pcm.join(",")
        ));
    }
    out
}

/// The first held-out event, as JSON inputs.
fn event_inputs(image: bool, audio: bool) -> Vec<String> {
    inputs_of(&paired().0[0], image, audio)
}

/// A held-out event no variant of either modality is sure of (every top probability under
/// 0.99, from the outputs the evaluation sets keep): no average of answers reaches 1.0 on it.
fn unsure_event() -> osprey_core::multimodal::PairedEvent {
    let (events, evals) = paired();
    let unsure = |k: usize, i: usize| {
        (0..evals[k].variants.len()).all(|v| evals[k].probabilities(v, i).unwrap().iter().all(|&p| p < 0.99))
    };
    events
        .into_iter()
        .find(|e| unsure(0, e.samples[0]) && unsure(1, e.samples[1]))
        .expect("an event no variant is sure of")
}

fn body(inputs: &[String], params: &str) -> String {
    format!(r#"{{"inputs":[{}],"parameters":{{{params}}}}}"#, inputs.join(","))
}

fn param<'a>(v: &'a serde_json::Value, k: &str) -> &'a serde_json::Value {
    &v["parameters"][k]
}

/// tritonclient (HTTP and gRPC): one modality, both, a batch, and refusals
/// (tests/python/multimodal.py says what it checks).
#[test]
fn multimodal_requests_through_tritonclient() {
    let dir = scratch("triton");
    let config = dir.join("osprey.toml");
    std::fs::write(
        &config,
        "[[tenants]]\nname = \"site\"\nlatency_slo_ms = 2000\n[tenants.quality]\nmax_ensemble = 3\n\
         min_confidence = 0.999\nstrategy = \"select_by_overall_accuracy\"\nfusion = \"product\"\n",
    )
    .unwrap();
    let server = Server::start(&["--config", &config.to_string_lossy()]);
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/multimodal.py"))
        .args(["--http", &server.http, "--grpc", &server.grpc, "--models"])
        .arg(repo_root().join("models"))
        .output()
        .expect("run python3 (install it and `pip install tritonclient[http,grpc] numpy`)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "multi-modal checks failed:\n{text}");
    assert!(text.contains("checks passed"), "{text}");
    assert!(server.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tenants' objectives decide: allowed modalities and explanations (403 otherwise), the
/// ensemble size, the strategy and the fusion rule; a request's `min_confidence` replaces the
/// tenant's target; an explained answer says which service explained it.
#[test]
fn tenant_objectives_shape_the_refinement() {
    let dir = scratch("tenants");
    let config = dir.join("osprey.toml");
    let hash = osprey_server::tenants::hash_key;
    std::fs::write(
        &config,
        format!(
            "[[tenants]]\nname = \"camera\"\napi_keys = [\"{}\"]\nlatency_slo_ms = 2000\n\
             [tenants.quality]\nmodalities = [\"image\"]\nmax_ensemble = 1\nexplain = \"never\"\n\
             [[tenants]]\nname = \"careful\"\napi_keys = [\"{}\"]\nlatency_slo_ms = 2000\n\
             [tenants.quality]\nmax_ensemble = 4\nmin_confidence = 1.0\nstrategy = \"enhance_generalization\"\n\
             fusion = \"weighted_average\"\n",
            hash("camera-key-0123456789"),
            hash("careful-key-0123456789"),
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", &config.to_string_lossy()]);
    let path = "/v2/models/digit_events/infer";
    let camera = Some("camera-key-0123456789");
    let careful = Some("careful-key-0123456789");

    // The camera tenant: image only, one call.
    let (status, text) = post_as(&server.http, path, camera, &body(&event_inputs(true, false), ""));
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(param(&v, "modalities"), "image", "{v}");
    assert_eq!(param(&v, "calls"), 1);
    assert_eq!(param(&v, "refined"), false);
    assert_eq!(v["model_name"], "digit_events");
    assert_eq!(v["outputs"][0]["name"], "probabilities");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 10]));
    let (status, text) = post_as(&server.http, path, camera, &body(&event_inputs(true, true), ""));
    assert_eq!(status, 403, "a modality the tenant may not use: {text}");
    assert!(text.contains("audio"), "{text}");
    let (status, text) =
        post_as(&server.http, path, camera, &body(&event_inputs(true, false), r#""explain":true"#));
    assert_eq!(status, 403, "explanations are off for this tenant: {text}");
    assert!(text.contains("explain"), "{text}");

    // The careful tenant: a target nothing reaches on an event no variant is sure of, so every
    // service that fits is called, up to its ensemble size of 4 (both modalities have three
    // variants each).
    let unsure = unsure_event();
    let (status, text) = post_as(&server.http, path, careful, &body(&inputs_of(&unsure, true, true), ""));
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(param(&v, "fusion"), "weighted_average");
    assert_eq!(param(&v, "refined"), true, "{v}");
    let calls = param(&v, "calls").as_i64().unwrap();
    assert!(calls <= 4, "{v}");
    let ensemble = param(&v, "ensemble").as_str().unwrap();
    assert_eq!(ensemble.split(',').count() as i64, calls, "every call answered: {ensemble}");
    assert!(ensemble.contains("image=") && ensemble.contains("audio="), "{ensemble}");
    assert_eq!(param(&v, "refinement_stop"), "ensemble_full", "{v}");
    // An explanation of the audio: one attribution per 50 ms segment.
    let (status, text) =
        post_as(&server.http, path, careful, &body(&event_inputs(false, true), r#""explain":true"#));
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["outputs"][1]["name"], "explanation", "{v}");
    assert_eq!(v["outputs"][1]["shape"], serde_json::json!([1, 16]));
    assert!(param(&v, "explained").as_str().unwrap_or("").starts_with("audio=spoken_digits/"), "{v}");
    // A request's own target: any answer meets 0, so one call.
    let (status, text) =
        post_as(&server.http, path, careful, &body(&event_inputs(true, true), r#""min_confidence":0.0"#));
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((param(&v, "calls"), param(&v, "refinement_stop")), (&1.into(), &"target_met".into()), "{v}");

    // Refusals: no modality at all, a bad target, the audio of the wrong type.
    let (status, text) = post_as(&server.http, path, careful, r#"{"inputs":[]}"#);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("at least one modality"), "{text}");
    let (status, text) =
        post_as(&server.http, path, careful, &body(&event_inputs(true, false), r#""min_confidence":2"#));
    assert_eq!(status, 400, "{text}");
    let wrong = r#"{"inputs":[{"name":"waveform","datatype":"FP32","shape":[1,2],"data":[0,0]}]}"#;
    let (status, text) = post_as(&server.http, path, careful, wrong);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("modality 'audio'"), "{text}");
    assert!(server.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// GET with a bearer key; returns the body.
fn get_as(addr: &str, path: &str, key: &str) -> String {
    let resp = common::http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\r\n"),
    );
    resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// The sum of the `osprey_requests` counters of `model` (every variant; every outcome but
/// `except`) in an OpenMetrics text.
fn requests_of(metrics: &str, model: &str, except: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("osprey_requests_total{") && l.contains(&format!("model=\"{model}\"")))
        .filter(|l| !l.contains(&format!("outcome=\"{except}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The fused answer's probabilities (row 0) and the (model, variant) of every call, from
/// the response's `ensemble` parameter (`image=digits/large@local-0,audio=...`: each call's
/// modality, model, variant and node).
fn fused_and_ensemble(v: &serde_json::Value) -> (Vec<f64>, Vec<(String, String)>) {
    let probs = v["outputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let ensemble = param(v, "ensemble")
        .as_str()
        .unwrap()
        .split(',')
        .map(|c| {
            let (_, mv) = c.split_once('=').unwrap();
            let (m, var) = mv.split_once('/').unwrap();
            let var = var.split_once('@').map_or(var, |(v, _)| v);
            (m.to_string(), var.to_string())
        })
        .collect();
    (probs, ensemble)
}

/// One member's own answer on its version `variant` (row 0's probabilities).
fn member_answer(addr: &str, key: &str, model: &str, variant: &str, event: &[String]) -> Vec<f64> {
    let input = if model == "digits" { &event[0] } else { &event[1] };
    let path = format!("/v2/models/{model}/versions/{variant}/infer");
    let (status, text) = post_as(addr, &path, Some(key), &body(std::slice::from_ref(input), ""));
    assert_eq!(status, 200, "{path}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["outputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// The baselines of `[scheduler] multimodal` answer through the gateway by a fan-out: every
/// modality called at once (the fixed ensemble pinned to each modality's best profiled
/// variant, EDF left to the member's rule), the answers fused by the policy's rule and equal
/// to that rule over the members' own answers; the tenant is charged once per request, and a
/// request refused by its quota runs no member at all.
#[test]
fn baselines_fan_out_through_the_gateway() {
    let hash = osprey_server::tenants::hash_key;
    for (policy, fusion) in [("fixed-ensemble", "product"), ("edf", "average")] {
        let dir = scratch(policy);
        let config = dir.join("osprey.toml");
        std::fs::write(
            &config,
            format!(
                "[scheduler]\nmultimodal = \"{policy}\"\n\
                 [[tenants]]\nname = \"site\"\napi_keys = [\"{}\"]\nlatency_slo_ms = 5000\nrate = 0.001\nburst = 3\n\
                 [tenants.quality]\nmax_ensemble = 1\nfusion = \"product\"\n\
                 [[tenants]]\nname = \"ops\"\napi_keys = [\"{}\"]\nrole = \"admin\"\nlatency_slo_ms = 5000\n",
                hash("site-key-0123456789"),
                hash("ops-key-0123456789"),
            ),
        )
        .unwrap();
        let server = Server::start(&["--config", &config.to_string_lossy()]);
        let (site, ops) = ("site-key-0123456789", "ops-key-0123456789");
        let path = "/v2/models/digit_events/infer";
        let unsure = unsure_event();
        let both = inputs_of(&unsure, true, true);

        // Both modalities: two calls at once, whatever the tenant's ensemble size says.
        let (status, text) = post_as(&server.http, path, Some(site), &body(&both, ""));
        assert_eq!(status, 200, "{policy}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(param(&v, "refinement_stop"), "fanned_out", "{policy}: {v}");
        assert_eq!(param(&v, "calls"), 2, "{policy}: {v}");
        assert_eq!(param(&v, "refined"), true, "{policy}: {v}");
        assert_eq!(param(&v, "fusion"), fusion, "{policy}: {v}");
        let (fused, ensemble) = fused_and_ensemble(&v);
        let mut models: Vec<&str> = ensemble.iter().map(|(m, _)| m.as_str()).collect();
        models.sort_unstable();
        assert_eq!(models, ["digits", "spoken_digits"], "{policy}: {v}");
        // One modality: one call, still a fan-out.
        let (status, text) = post_as(&server.http, path, Some(site), &body(&both[..1], ""));
        assert_eq!(status, 200, "{policy}: {text}");
        let one: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!((param(&one, "calls"), param(&one, "refined")), (&1.into(), &false.into()), "{one}");
        assert_eq!(param(&one, "modalities"), "image", "{one}");
        // The quota (a burst of 3) admits one more request, then refuses: a refused request
        // is refused before any of its calls runs.
        let (status, text) = post_as(&server.http, path, Some(site), &body(&both, ""));
        assert_eq!(status, 200, "{policy}: {text}");
        let before = get_as(&server.http, "/metrics", ops);
        for _ in 0..3 {
            let (status, text) = post_as(&server.http, path, Some(site), &body(&both, ""));
            assert_eq!(status, 429, "{policy}: over the quota: {text}");
        }
        let after = get_as(&server.http, "/metrics", ops);
        assert!(requests_of(&before, "spoken_digits", "") >= 2, "{policy}: {before}");
        for model in ["digits", "spoken_digits"] {
            let ran = |m: &str| requests_of(m, model, "resource_exhausted");
            assert_eq!(ran(&before), ran(&after), "{policy}: a refused request ran {model}:\n{after}");
        }
        assert!(
            requests_of(&after, "digits", "") > requests_of(&before, "digits", ""),
            "refusals are counted"
        );

        // The fused answer is the policy's rule over the members' own answers.
        let answers: Vec<Vec<f64>> =
            ensemble.iter().map(|(m, var)| member_answer(&server.http, ops, m, var, &both)).collect();
        let expected: Vec<f64> = match fusion {
            "product" => {
                let p: Vec<f64> =
                    (0..10).map(|y| answers.iter().map(|a| a[y].max(1e-12)).product()).collect();
                let z: f64 = p.iter().sum();
                p.iter().map(|x| x / z).collect()
            }
            _ => (0..10).map(|y| answers.iter().map(|a| a[y]).sum::<f64>() / answers.len() as f64).collect(),
        };
        for (y, (f, e)) in fused.iter().zip(&expected).enumerate() {
            assert!((f - e).abs() < 1e-4, "{policy}: class {y}: fused {f} vs {e} from {answers:?}");
        }
        assert!(server.stop().success());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
