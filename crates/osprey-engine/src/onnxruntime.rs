//! The second engine: ONNX Runtime, loaded at run time from its shared library.
//!
//! tract stays the default (pure Rust, nothing native to ship to an edge node). Some graphs from
//! the wild use operators or shape arithmetic tract cannot translate; those run here, on the
//! `libonnxruntime.so` that the `onnxruntime` PyPI wheel ships (`onnxruntime/capi/`), or any
//! build of ONNX Runtime 1.24 or newer. Nothing is linked at build time (`ort`'s `load-dynamic`):
//! a binary without the library serves every tract model and says, for an onnxruntime one,
//! where it looked.
//!
//! # Where the library comes from
//! The first of: the path given to [`set_library`] (`--onnxruntime`, or `[engine] onnxruntime`
//! in the server config), `$OSPREY_ONNXRUNTIME`, `$ORT_DYLIB_PATH` (`ort`'s own variable), then
//! `libonnxruntime.so*` beside the executable, in `../lib` from it, or in
//! `../share/osprey/lib`. The environment is built once per process.
//!
//! # Execution
//! One call runs on one thread (`intra_op` = `inter_op` = 1), like a tract call: Osprey's
//! workers are the parallelism, and a node's thread budget stays what the placement counted.
//! `ort`'s `Session::run` takes `&mut self`, so a session is used by one caller at a time; idle
//! sessions are pooled and one more is built from the kept model bytes when every pooled one is
//! busy (the same shape as tract's pool of run states; weights are then held once per
//! concurrent caller, which the zoo's sizes afford).

use ort::memory::Allocator;
use ort::session::Session as OrtSession;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType, ValueType};
use osprey_core::error::{Error, Result};
use osprey_core::model::TensorSpec;
use osprey_core::tensor::{DataType, RawTensor};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The library path chosen by the operator, before the first session is built.
static CHOSEN: OnceLock<PathBuf> = OnceLock::new();
/// The process's environment, or why it could not be built (kept: one attempt per process).
static ENVIRONMENT: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> =
    OnceLock::new();

/// Names the library to load. Takes effect only before the first onnxruntime session; returns
/// false when a library was already chosen or loaded.
pub fn set_library(path: PathBuf) -> bool {
    ENVIRONMENT.get().is_none() && CHOSEN.set(path).is_ok()
}

/// The candidate paths, in the order they are tried.
fn candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(p) = CHOSEN.get() {
        out.push(p.clone());
        return out;
    }
    for var in ["OSPREY_ONNXRUNTIME", "ORT_DYLIB_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            out.push(PathBuf::from(v));
            return out;
        }
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        for d in [dir.clone(), dir.join("../lib"), dir.join("../share/osprey/lib")] {
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            found.sort();
            out.extend(found);
        }
    }
    out
}

/// The process's ONNX Runtime environment, built on first use.
fn environment() -> Result<&'static ort::environment::Environment> {
    let built = ENVIRONMENT.get_or_init(|| {
        let tried = candidates();
        if tried.is_empty() {
            return Err("no ONNX Runtime library was named: set OSPREY_ONNXRUNTIME to libonnxruntime.so \
                        (pip install onnxruntime; it is in site-packages/onnxruntime/capi/), or pass \
                        --onnxruntime PATH"
                .to_string());
        }
        let mut errors = Vec::new();
        for path in tried {
            if !path.is_file() {
                errors.push(format!("{}: no such file", path.display()));
                continue;
            }
            // `init_from` loads the library once per process; a failed load leaves nothing behind.
            let env = ort::init_from(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| b.with_name("osprey").build().map_err(|e| e.to_string()));
            match env {
                Ok(env) => {
                    tracing::info!(library = %path.display(), "onnxruntime loaded");
                    return Ok((path, env));
                }
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
        Err(format!("ONNX Runtime could not be loaded ({})", errors.join("; ")))
    });
    match built {
        Ok((_, env)) => Ok(env),
        Err(e) => Err(Error::unavailable(e.clone())),
    }
}

/// The library in use, once loaded.
pub fn library() -> Option<&'static Path> {
    match ENVIRONMENT.get() {
        Some(Ok((p, _))) => Some(p),
        _ => None,
    }
}

/// Whether the library can be loaded (loads it if not yet).
pub fn available() -> bool {
    environment().is_ok()
}

fn element_type(dt: DataType) -> Option<TensorElementType> {
    Some(match dt {
        DataType::Bool => TensorElementType::Bool,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Bytes => return None,
    })
}

/// A graph loaded into ONNX Runtime.
pub struct Loaded {
    bytes: Vec<u8>,
    pool: Mutex<Vec<OrtSession>>,
    names_in: Vec<String>,
    names_out: Vec<String>,
}

fn build(bytes: &[u8]) -> std::result::Result<OrtSession, String> {
    let env = environment().map_err(|e| e.message)?;
    let e = |e: ort::Error| e.to_string();
    OrtSession::builder(env)
        .map_err(e)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|x| x.to_string())?
        .with_intra_threads(1)
        .map_err(|x| x.to_string())?
        .with_inter_threads(1)
        .map_err(|x| x.to_string())?
        .commit_from_memory(bytes)
        .map_err(e)
}

/// `model.toml`'s tensors against the session's, by position: count, names, element types and
/// the dimensions after the batch wherever the graph fixes them.
fn check(path: &Path, kind: &str, graph: &[ort::value::Outlet], declared: &[TensorSpec]) -> Result<()> {
    let bad = |m: String| Error::invalid(format!("{}: {m}", path.display()));
    if graph.len() != declared.len() {
        return Err(bad(format!(
            "model.toml declares {} {kind}(s), the graph has {}",
            declared.len(),
            graph.len()
        )));
    }
    for (g, spec) in graph.iter().zip(declared) {
        if g.name() != spec.name {
            return Err(bad(format!(
                "{kind} '{}': model.toml declares the name '{}', the graph has '{}'",
                spec.name,
                spec.name,
                g.name()
            )));
        }
        let ValueType::Tensor { ty, shape, .. } = g.dtype() else {
            return Err(bad(format!("{kind} '{}' is not a tensor ({})", spec.name, g.dtype())));
        };
        if Some(*ty) != element_type(spec.datatype) {
            return Err(bad(format!(
                "{kind} '{}': model.toml declares datatype {}, the graph has {ty}",
                spec.name, spec.datatype
            )));
        }
        let dims: &[i64] = shape;
        let fits = dims.len() == spec.shape.len()
            && dims.iter().zip(&spec.shape).skip(1).all(|(&g, &d)| g < 0 || g == d);
        if !fits {
            return Err(bad(format!(
                "{kind} '{}': model.toml declares shape {:?}, the graph has {dims:?}",
                spec.name, spec.shape
            )));
        }
    }
    Ok(())
}

impl Loaded {
    /// Loads the graph at `path` and checks it against the declared tensors.
    pub fn load(path: &Path, inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Result<Loaded> {
        if let Some(t) = inputs.iter().chain(outputs).find(|t| element_type(t.datatype).is_none()) {
            return Err(Error::invalid(format!(
                "{}: tensor '{}' is {}; the onnxruntime engine runs numeric tensors only",
                path.display(),
                t.name,
                t.datatype
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        let session =
            build(&bytes).map_err(|e| Error::invalid(format!("{}: onnxruntime: {e}", path.display())))?;
        check(path, "input", session.inputs(), inputs)?;
        check(path, "output", session.outputs(), outputs)?;
        Ok(Loaded {
            names_in: session.inputs().iter().map(|o| o.name().to_string()).collect(),
            names_out: session.outputs().iter().map(|o| o.name().to_string()).collect(),
            pool: Mutex::new(vec![session]),
            bytes,
        })
    }

    /// Runs one batch; `inputs` were checked against the declaration by the caller.
    pub fn run(&self, inputs: &[RawTensor], outputs: &[TensorSpec]) -> Result<Vec<RawTensor>> {
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for (t, name) in inputs.iter().zip(&self.names_in) {
            values.push((name.clone(), to_value(t)?));
        }
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut session = match pooled {
            Some(s) => s,
            None => build(&self.bytes).map_err(|e| Error::internal(format!("onnxruntime: {e}")))?,
        };
        let result = (|| {
            let out = session.run(values).map_err(|e| Error::internal(format!("inference failed: {e}")))?;
            self.names_out
                .iter()
                .zip(outputs)
                .map(|(name, spec)| {
                    let v = out
                        .get(name.as_str())
                        .ok_or_else(|| Error::internal(format!("onnxruntime returned no '{name}'")))?;
                    from_value(v, spec)
                })
                .collect::<Result<Vec<_>>>()
        })();
        // A session stays usable after a failed run (ONNX Runtime keeps no state between runs).
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(session);
        result
    }
}

/// An input as an ONNX Runtime tensor: a tensor of the declared type and shape is allocated
/// and the bytes copied in (one copy, no per-element work; the protocol layer's bytes are
/// little-endian like this machine's).
fn to_value(t: &RawTensor) -> Result<DynValue> {
    let e = |e: ort::Error| Error::internal(format!("building an onnxruntime input: {e}"));
    let ty = element_type(t.datatype)
        .ok_or_else(|| Error::internal("the onnxruntime engine runs numeric tensors only"))?;
    let mut tensor = DynTensor::new(&Allocator::default(), ty, t.shape.clone()).map_err(e)?;
    let size = tensor.size().unwrap_or(usize::MAX);
    if size != t.data.len() {
        return Err(Error::internal(format!("input of {} bytes for a tensor of {size}", t.data.len())));
    }
    if size > 0 {
        let dst = tensor.data_ptr_mut().cast::<u8>();
        if dst.is_null() {
            return Err(Error::internal("onnxruntime allocated no input buffer"));
        }
        // SAFETY: `dst` is the CPU buffer of a freshly allocated tensor of exactly `size` bytes
        // (checked above), which nothing else references yet; BOOL is copied as 0 or 1 only.
        unsafe {
            if t.datatype == DataType::Bool {
                for (i, &b) in t.data.iter().enumerate() {
                    *dst.add(i) = u8::from(b != 0);
                }
            } else {
                std::ptr::copy_nonoverlapping(t.data.as_ptr(), dst, size);
            }
        }
    }
    Ok(tensor.into_dyn())
}

/// An output back into bytes, after checking its type against the declaration.
fn from_value(v: &DynValue, spec: &TensorSpec) -> Result<RawTensor> {
    let e = |e: ort::Error| Error::internal(format!("output '{}': {e}", spec.name));
    let tensor = v.view().downcast::<DynTensorValueType>().map_err(e)?;
    if Some(*tensor.data_type()) != element_type(spec.datatype) {
        return Err(Error::internal(format!(
            "output '{}' is {}, the model declares {}",
            spec.name,
            tensor.data_type(),
            spec.datatype
        )));
    }
    let shape: Vec<i64> = tensor.shape().to_vec();
    let size = tensor.size().ok_or_else(|| Error::internal(format!("output '{}' has no size", spec.name)))?;
    let src = tensor.data_ptr().cast::<u8>();
    let data = if size == 0 || src.is_null() {
        Vec::new()
    } else {
        // SAFETY: ONNX Runtime's CPU output buffer of `size` bytes (its own count for this
        // element type and shape), alive while `out` (the session's outputs) is borrowed.
        unsafe { std::slice::from_raw_parts(src, size) }.to_vec()
    };
    RawTensor::from_bytes(spec.datatype, shape, data)
}
