//! One model variant loaded for execution, on one of two engines.
//!
//! **tract** (the default): the ONNX graph's batch dimension is made symbolic (`N`) and stays
//! symbolic through optimisation, so one plan serves every batch size. The plan is immutable
//! and shared (`Arc`); run states are pooled, so any number of worker threads may run the same
//! session at once. **onnxruntime** ([`crate::onnxruntime`]): for graphs tract cannot
//! translate, or models whose `model.toml` names it.
//!
//! Engine choice ([`Session::load`]): `engine = "tract"` or `"onnxruntime"` in `model.toml`
//! runs that engine only; without the key a variant tract refuses is retried on onnxruntime,
//! when its library can be loaded, and a warning names the variant and tract's reason. Either
//! way the graph is checked against `model.toml` (names, datatypes, per-sample dimensions)
//! before it serves, and [`Session::run`] checks every batch against the declaration.

use osprey_core::error::{Error, Result};
use osprey_core::model::{Engine, ModelSpec, TensorSpec, VariantSpec};
use osprey_core::tensor::{DataType, RawTensor};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

pub struct Session {
    backend: Backend,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

enum Backend {
    Tract(TractPlan),
    Onnxruntime(crate::onnxruntime::Loaded),
}

struct TractPlan {
    plan: Arc<TypedRunnableModel>,
    /// Run states kept between calls (one per concurrent caller at most): a state costs
    /// allocations to build, and tract resets it (values and resolved symbols) after each run,
    /// so reusing one is the same computation. A state whose run failed is dropped.
    states: std::sync::Mutex<Vec<TypedSimpleState>>,
    /// Per output: whether the engine types it symbolically (`TDim`, as tract does for shape
    /// arithmetic such as an ArgMax label) and it is cast to the declared integer type.
    casts: Vec<bool>,
}

/// Name of a graph input or output: the ONNX value name, as tract labels the outlet.
fn outlet_name<F, O>(model: &Graph<F, O>, o: OutletId) -> String
where
    F: Fact + Clone + 'static,
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
{
    model.outlet_label(o).map(String::from).unwrap_or_else(|| model.node(o.node).name.clone())
}

fn mismatch(path: &Path, kind: &str, name: &str, what: &str, declared: String, graph: String) -> Error {
    Error::invalid(format!(
        "{}: {kind} '{name}': model.toml declares {what} {declared}, the graph has {graph}",
        path.display()
    ))
}

/// `model.toml`'s inputs against the graph's, by position: same count, same names, and the
/// datatype and per-sample dimensions wherever the graph fixes them (a symbolic or unknown
/// dimension accepts any declared size).
fn check_inputs(path: &Path, model: &InferenceModel, declared: &[TensorSpec]) -> Result<()> {
    let outlets = model.input_outlets().map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    if outlets.len() != declared.len() {
        return Err(Error::invalid(format!(
            "{}: model.toml declares {} input(s), the graph has {}",
            path.display(),
            declared.len(),
            outlets.len()
        )));
    }
    for (&o, spec) in outlets.iter().zip(declared) {
        let name = outlet_name(model, o);
        if name != spec.name {
            return Err(mismatch(
                path,
                "input",
                &spec.name,
                "the name",
                format!("'{}'", spec.name),
                format!("'{name}'"),
            ));
        }
        let fact = model.outlet_fact(o).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        if let Some(dt) = fact.datum_type.concretize()
            && dt != datum(spec.datatype)
        {
            return Err(mismatch(
                path,
                "input",
                &spec.name,
                "datatype",
                spec.datatype.to_string(),
                format!("{dt:?}"),
            ));
        }
        // A closed shape has a known rank; its dimensions may still be unknown or symbolic.
        if !fact.shape.is_open() {
            let graph: Vec<Option<i64>> =
                fact.shape.dims().map(|d| d.concretize().and_then(|d| d.to_i64().ok())).collect();
            if !fits(&graph, &spec.shape) {
                return Err(mismatch(
                    path,
                    "input",
                    &spec.name,
                    "shape",
                    format!("{:?}", spec.shape),
                    shape_text(&graph),
                ));
            }
        }
    }
    Ok(())
}

/// Whether a graph's dimensions (`None`: symbolic or unknown) admit a declared shape: same rank,
/// and every fixed dimension after the batch equal.
fn fits(graph: &[Option<i64>], declared: &[i64]) -> bool {
    graph.len() == declared.len()
        && graph.iter().zip(declared).skip(1).all(|(g, &d)| g.is_none_or(|g| g == d))
}

fn shape_text(dims: &[Option<i64>]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.map_or("?".into(), |d| d.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

/// `model.toml`'s outputs against the optimised graph's, by position: count, names,
/// datatypes (a symbolic integer output declared as an integer type is cast, see
/// [`Session::run`]) and per-sample dimensions. Returns which outputs are cast.
fn check_outputs(path: &Path, model: &TypedModel, declared: &[TensorSpec]) -> Result<Vec<bool>> {
    let outlets = model.output_outlets().map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    if outlets.len() != declared.len() {
        return Err(Error::invalid(format!(
            "{}: model.toml declares {} output(s), the graph has {}",
            path.display(),
            declared.len(),
            outlets.len()
        )));
    }
    let mut casts = Vec::with_capacity(declared.len());
    for (&o, spec) in outlets.iter().zip(declared) {
        let name = outlet_name(model, o);
        if name != spec.name {
            return Err(mismatch(
                path,
                "output",
                &spec.name,
                "the name",
                format!("'{}'", spec.name),
                format!("'{name}'"),
            ));
        }
        let fact = model.outlet_fact(o).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        let want = datum(spec.datatype);
        let cast = fact.datum_type == DatumType::TDim && spec.datatype.is_integer();
        if fact.datum_type != want && !cast {
            return Err(mismatch(
                path,
                "output",
                &spec.name,
                "datatype",
                spec.datatype.to_string(),
                format!("{:?}", fact.datum_type),
            ));
        }
        casts.push(cast);
        let graph: Vec<Option<i64>> = fact.shape.iter().map(|d| d.to_i64().ok()).collect();
        if !fits(&graph, &spec.shape) {
            return Err(mismatch(
                path,
                "output",
                &spec.name,
                "shape",
                format!("{:?}", spec.shape),
                shape_text(&graph),
            ));
        }
    }
    Ok(casts)
}

/// Runs `plan` on a run state taken from `states` (spawned when none is free) and returns the
/// state to the pool afterwards; a state whose run failed is dropped.
pub(crate) fn run_pooled(
    plan: &Arc<TypedRunnableModel>,
    states: &std::sync::Mutex<Vec<TypedSimpleState>>,
    values: TVec<TValue>,
) -> TractResult<TVec<TValue>> {
    let pooled = states.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let mut state = match pooled {
        Some(s) => s,
        None => plan.spawn()?,
    };
    let out = state.run(values)?;
    states.lock().unwrap_or_else(|e| e.into_inner()).push(state);
    Ok(out)
}

fn datum(dt: DataType) -> DatumType {
    match dt {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Fp16 => DatumType::F16,
        DataType::Bytes => DatumType::String,
    }
}

impl Session {
    /// Loads `variant` of `model` on the engine its `model.toml` names (see the module docs).
    pub fn load(model: &ModelSpec, variant: &VariantSpec) -> Result<Session> {
        let path = model.variant_path(variant)?;
        match model.engine {
            Some(engine) => Self::load_on(engine, &path, &model.inputs, &model.outputs),
            None => match Self::load_path(&path, &model.inputs, &model.outputs) {
                Ok(s) => Ok(s),
                Err(tract) => {
                    if !crate::onnxruntime::available() {
                        return Err(Error::invalid(format!(
                            "{} (tract; onnxruntime could be tried: set OSPREY_ONNXRUNTIME to \
                             libonnxruntime.so)",
                            tract.message
                        )));
                    }
                    match Self::load_on(Engine::Onnxruntime, &path, &model.inputs, &model.outputs) {
                        Ok(s) => {
                            tracing::warn!(
                                model = %model.name,
                                variant = %variant.name,
                                reason = %tract.message,
                                "tract cannot run this variant; it runs on onnxruntime"
                            );
                            Ok(s)
                        }
                        Err(ort) => Err(Error::invalid(format!(
                            "tract: {}; onnxruntime: {}",
                            tract.message, ort.message
                        ))),
                    }
                }
            },
        }
    }

    /// Loads the graph at `path` on `engine` only.
    pub fn load_on(
        engine: Engine,
        path: &Path,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<Session> {
        match engine {
            Engine::Tract => Self::load_path(path, inputs, outputs),
            Engine::Onnxruntime => Ok(Session {
                backend: Backend::Onnxruntime(crate::onnxruntime::Loaded::load(path, inputs, outputs)?),
                inputs: inputs.to_vec(),
                outputs: outputs.to_vec(),
            }),
        }
    }

    /// The engine this session runs on.
    pub fn engine(&self) -> Engine {
        match self.backend {
            Backend::Tract(_) => Engine::Tract,
            Backend::Onnxruntime(_) => Engine::Onnxruntime,
        }
    }

    /// Loads the graph at `path` through tract for tensors declared as `inputs` and
    /// `outputs`, after checking the declaration against the graph.
    pub fn load_path(path: &Path, inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Result<Session> {
        let fail = |e: TractError| Error::invalid(format!("{}: {e:#}", path.display()));
        let mut model = tract_onnx::onnx().model_for_path(path).map_err(fail)?;
        check_inputs(path, &model, inputs)?;
        let batch = model.symbols.sym("N");
        for (i, spec) in inputs.iter().enumerate() {
            let mut dims: Vec<TDim> = vec![batch.clone().into()];
            dims.extend(spec.sample_shape().iter().map(|&d| TDim::from(d)));
            model.set_input_fact(i, InferenceFact::dt_shape(datum(spec.datatype), dims)).map_err(fail)?;
        }
        let typed = model.into_optimized().map_err(fail)?;
        let casts = check_outputs(path, &typed, outputs)?;
        let plan = typed.into_runnable().map_err(fail)?;
        Ok(Session {
            backend: Backend::Tract(TractPlan { casts, plan, states: Default::default() }),
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
        })
    }

    /// Runs one batch. `inputs` are in the model's declared input order and agree on rows.
    pub fn run(&self, inputs: &[RawTensor]) -> Result<Vec<RawTensor>> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::internal("input count does not match the model"));
        }
        for (t, spec) in inputs.iter().zip(&self.inputs) {
            if t.datatype != spec.datatype || t.shape[1..] != *spec.sample_shape() || t.datatype.is_variable()
            {
                return Err(Error::internal(format!("input '{}' does not match the model", spec.name)));
            }
        }
        let tract = match &self.backend {
            Backend::Tract(t) => t,
            Backend::Onnxruntime(o) => return o.run(inputs, &self.outputs),
        };
        let mut values: TVec<TValue> = TVec::new();
        for (t, spec) in inputs.iter().zip(&self.inputs) {
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            // SAFETY: `from_raw_dt` copies `t.data` after checking its length against shape x
            // element size; any bit pattern is a valid value of these plain numeric types.
            let tensor = unsafe { Tensor::from_raw_dt(datum(t.datatype), &shape, &t.data) }
                .map_err(|e| Error::internal(format!("building input '{}': {e}", spec.name)))?;
            values.push(tensor.into_tvalue());
        }
        let fail = |e: TractError| Error::internal(format!("inference failed: {e:#}"));
        let out = run_pooled(&tract.plan, &tract.states, values).map_err(fail)?;
        out.iter()
            .zip(&self.outputs)
            .zip(&tract.casts)
            .map(|((v, spec), &cast)| {
                let casted;
                let v = if cast {
                    casted = v.cast_to_dt(datum(spec.datatype)).map_err(fail)?.into_owned();
                    &casted
                } else {
                    &**v
                };
                if v.datum_type() != datum(spec.datatype) {
                    return Err(Error::internal(format!(
                        "output '{}' is {:?}, the model declares {}",
                        spec.name,
                        v.datum_type(),
                        spec.datatype
                    )));
                }
                let shape = v.shape().iter().map(|&d| d as i64).collect();
                RawTensor::from_bytes(spec.datatype, shape, v.as_bytes().to_vec())
            })
            .collect()
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use osprey_core::model::scan_repository;

    #[test]
    fn a_reused_run_state_gives_the_same_outputs_across_batch_sizes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let (models, _) = scan_repository(&root).unwrap();
        let m = models.iter().find(|m| m.name == "digits").unwrap();
        let ev = m.load_eval().unwrap().unwrap();
        let s = Session::load(m, &m.variants[1]).unwrap();
        let batch = |n: usize| {
            let bytes: Vec<u8> = (0..n).flat_map(|i| ev.sample(i).to_vec()).collect();
            RawTensor::from_bytes(DataType::Fp32, vec![n as i64, 8, 8], bytes).unwrap()
        };
        let five = s.run(&[batch(5)]).unwrap();
        let one = s.run(&[batch(1)]).unwrap();
        assert_eq!(one[0].shape, vec![1, 10]);
        assert_eq!(one[0].data, five[0].data[..40].to_vec(), "row 0 alone equals row 0 of the batch");
        assert_eq!(s.run(&[batch(5)]).unwrap(), five);
        // A refused input (wrong shape) leaves the pooled state as it was.
        let bad = RawTensor::from_bytes(DataType::Fp32, vec![1, 4, 16], vec![0; 256]).unwrap();
        assert!(s.run(&[bad]).is_err());
        assert_eq!(s.run(&[batch(5)]).unwrap(), five);
    }

    #[test]
    fn every_bundled_variant_runs_at_batch_1_and_5_and_matches_its_eval_labels() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let (models, _) = scan_repository(&root).unwrap();
        for m in &models {
            let ev = m.load_eval().unwrap().unwrap();
            let spec = &m.inputs[0];
            let pred_col = |v: &str| {
                let text = std::fs::read_to_string(m.dir.join("eval/labels.csv")).unwrap();
                let mut lines = text.lines();
                let header: Vec<&str> = lines.next().unwrap().split(',').collect();
                let c = header.iter().position(|h| *h == format!("{v}_pred")).unwrap();
                lines.map(|l| l.split(',').nth(c).unwrap().parse::<usize>().unwrap()).collect::<Vec<_>>()
            };
            for v in &m.variants {
                let s = Session::load(m, v).unwrap();
                let want = pred_col(&v.name);
                for n in [1usize, 5] {
                    let bytes: Vec<u8> = (0..n).flat_map(|i| ev.sample(i).to_vec()).collect();
                    let mut shape = spec.shape.clone();
                    shape[0] = n as i64;
                    let x = RawTensor::from_bytes(spec.datatype, shape, bytes).unwrap();
                    let out = s.run(&[x]).unwrap();
                    let dim = *m.outputs[0].shape.last().unwrap();
                    assert_eq!(out[0].shape, vec![n as i64, dim], "{}/{}", m.name, v.name);
                    // Only a class distribution has an argmax to check against the labels (a
                    // pipeline's denoiser outputs an image; its stage predictions are in context).
                    if dim as usize != m.labels.len() {
                        continue;
                    }
                    let p = out[0].to_f32().unwrap();
                    for i in 0..n {
                        let row = &p[i * 10..(i + 1) * 10];
                        let arg = (0..10).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
                        assert_eq!(arg, want[i], "{}/{} sample {i}", m.name, v.name);
                    }
                }
            }
        }
    }

    fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
        TensorSpec { name: name.into(), datatype, shape: shape.to_vec() }
    }

    #[test]
    fn a_declaration_that_disagrees_with_the_graph_is_refused_naming_both() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits/small.onnx");
        let image = spec("image", DataType::Fp32, &[-1, 8, 8]);
        let probs = spec("probabilities", DataType::Fp32, &[-1, 10]);
        assert!(
            Session::load_path(&root, std::slice::from_ref(&image), std::slice::from_ref(&probs)).is_ok()
        );
        let cases = [
            (vec![spec("img", DataType::Fp32, &[-1, 8, 8])], vec![probs.clone()], "input 'img'", "'image'"),
            (
                vec![image.clone()],
                vec![spec("probabilities", DataType::Fp32, &[-1, 12])],
                "output 'probabilities'",
                "[-1, 12]",
            ),
            (
                vec![image.clone()],
                vec![spec("probabilities", DataType::Int64, &[-1, 10])],
                "datatype INT64",
                "F32",
            ),
            (
                vec![image.clone()],
                vec![spec("probs", DataType::Fp32, &[-1, 10])],
                "output 'probs'",
                "'probabilities'",
            ),
            (vec![image.clone()], vec![probs.clone(), probs.clone()], "2 output(s)", "has 1"),
        ];
        for (inputs, outputs, a, b) in cases {
            let e = Session::load_path(&root, &inputs, &outputs).err().expect("refused");
            assert!(
                e.message.contains("small.onnx") && e.message.contains(a) && e.message.contains(b),
                "{e}"
            );
        }
    }

    #[test]
    fn a_symbolically_typed_integer_output_is_cast_to_the_declared_type() {
        // scikit-learn's MLP exported by skl2onnx as shipped: tract types `label` as TDim.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let s = Session::load_path(
            &dir.join("sklearn_mlp.onnx"),
            &[spec("X", DataType::Fp32, &[-1, 64])],
            &[spec("label", DataType::Int64, &[-1]), spec("probabilities", DataType::Fp32, &[-1, 10])],
        )
        .unwrap();
        let Backend::Tract(t) = &s.backend else { panic!("loaded on tract") };
        assert_eq!(t.casts, vec![true, false], "the label is typed TDim by the engine");
        let x = std::fs::read(dir.join("sklearn_mlp_inputs.bin")).unwrap();
        let want: Vec<i64> = std::fs::read_to_string(dir.join("sklearn_mlp_labels.txt"))
            .unwrap()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        let out = s.run(&[RawTensor::from_bytes(DataType::Fp32, vec![8, 64], x).unwrap()]).unwrap();
        assert_eq!(out[0].datatype, DataType::Int64);
        let got: Vec<i64> =
            out[0].data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, want, "the labels scikit-learn predicts");
    }
}
