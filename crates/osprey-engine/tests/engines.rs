//! Both engines on real graphs: the zoo's variants answer alike on tract and onnxruntime, and
//! the models of `tests/wild/` (built by `scripts/fetch_wild.py`, which `.ci/run` runs) load
//! on the engine each needs and answer like onnxruntime run directly from Python.
//!
//! The onnxruntime library is the one the `onnxruntime` wheel ships (found through Python, or
//! `$OSPREY_ONNXRUNTIME`).

use osprey_core::model::{Engine, scan_repository};
use osprey_core::tensor::RawTensor;
use osprey_engine::Session;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The library path: `$OSPREY_ONNXRUNTIME`, else the installed wheel's.
fn library() -> PathBuf {
    if let Some(p) = std::env::var_os("OSPREY_ONNXRUNTIME") {
        return p.into();
    }
    let out = Command::new("python3")
        .args(["-c", "import onnxruntime, glob, os; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[0])"])
        .output()
        .expect("python3");
    assert!(out.status.success(), "pip install onnxruntime: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn init() {
    osprey_engine::onnxruntime::set_library(library());
    assert!(osprey_engine::onnxruntime::available(), "onnxruntime could not be loaded");
}

fn batch(
    m: &osprey_core::model::ModelSpec,
    ev: &osprey_core::model::EvalSet,
    first: usize,
    n: usize,
) -> RawTensor {
    let spec = &m.inputs[0];
    let bytes: Vec<u8> = (first..first + n).flat_map(|i| ev.sample(i).to_vec()).collect();
    let mut shape = spec.shape.clone();
    shape[0] = n as i64;
    RawTensor::from_bytes(spec.datatype, shape, bytes).unwrap()
}

fn max_diff(a: &RawTensor, b: &RawTensor) -> f64 {
    assert_eq!((a.datatype, &a.shape), (b.datatype, &b.shape));
    match a.datatype {
        osprey_core::tensor::DataType::Fp32 => {
            let (x, y) = (a.to_f32().unwrap(), b.to_f32().unwrap());
            x.iter().zip(&y).map(|(p, q)| f64::from((p - q).abs())).fold(0.0, f64::max)
        }
        _ => {
            if a.data == b.data {
                0.0
            } else {
                f64::INFINITY
            }
        }
    }
}

#[test]
fn every_zoo_variant_answers_alike_on_both_engines() {
    init();
    let (models, _) = scan_repository(&root().join("models")).unwrap();
    let mut checked = 0;
    for m in &models {
        let Some(ev) = m.load_eval().unwrap() else { continue };
        for v in &m.variants {
            let path = m.variant_path(v).unwrap();
            let t = Session::load_on(Engine::Tract, &path, &m.inputs, &m.outputs).unwrap();
            let o = Session::load_on(Engine::Onnxruntime, &path, &m.inputs, &m.outputs).unwrap();
            assert_eq!((t.engine(), o.engine()), (Engine::Tract, Engine::Onnxruntime));
            for n in [1, 8] {
                let x = batch(m, &ev, 0, n);
                let (a, b) = (t.run(std::slice::from_ref(&x)).unwrap(), o.run(&[x]).unwrap());
                for (a, b) in a.iter().zip(&b) {
                    let d = max_diff(a, b);
                    assert!(
                        d <= 1e-4,
                        "{}/{} batch {n}: tract and onnxruntime differ by {d}",
                        m.name,
                        v.name
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 9, "{checked} variants checked");
}

#[test]
fn models_from_the_wild_load_on_the_engine_they_need() {
    init();
    let dir = root().join("tests/wild");
    assert!(
        dir.join("magika/model.onnx").exists(),
        "{} is missing: run scripts/fetch_wild.py",
        dir.display()
    );
    let (models, problems) = scan_repository(&dir).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    for m in &models {
        let s = Session::load(m, &m.variants[0]).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        println!("{}: {}", m.name, s.engine());
        let ev = m.load_eval().unwrap().unwrap();
        let out = s.run(&[batch(m, &ev, 0, 4)]).unwrap();
        assert_eq!(out[0].shape[0], 4);
    }
}
