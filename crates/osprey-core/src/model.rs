//! The model repository on disk.
//!
//! ```text
//! <repository>/
//!   <model>/                  one folder per model (a task, e.g. `digits`)
//!     model.toml              task, modality, inputs/outputs, labels, variants + profiled accuracy
//!     <variant>.onnx          one ONNX file per variant
//!     profile.toml            optional: latency per variant and batch size (`osprey profile`)
//!     eval/inputs.bin         optional held-out evaluation inputs (raw tensor bytes)
//!     eval/labels.csv         optional: index,label,<variant>...  (1 = that variant was right)
//! ```
//!
//! Parsing is strict: unknown keys are errors that name the file and line; model and variant
//! names must match [`is_valid_name`]; every referenced file must resolve inside the model's
//! folder. [`scan_repository`] reports a broken model folder and carries on with the others.

use crate::error::{Error, Result};
use crate::tensor::DataType;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Names of models and variants: 1-64 chars of `[A-Za-z0-9_.-]`, starting alphanumeric.
/// Keeps names safe as path components, URL segments and metric labels.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.contains("..")
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    /// Dimensions with `-1` for the batch (first) dimension.
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Per-sample shape (without the batch dimension).
    pub fn sample_shape(&self) -> &[i64] {
        &self.shape[1..]
    }
    pub fn sample_elements(&self) -> usize {
        self.sample_shape().iter().map(|&d| d.max(0) as usize).product()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    pub file: String,
    #[serde(default)]
    pub description: String,
    /// Profiled accuracy on the held-out set, 0..1.
    pub accuracy: f64,
    /// Per-class accuracy, indexed like `labels`.
    #[serde(default)]
    pub class_accuracy: Vec<f64>,
    /// Resident memory the variant needs, MB.
    #[serde(default = "one")]
    pub memory_mb: u32,
    /// Threads one instance of this variant uses.
    #[serde(default = "one")]
    pub threads: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub inputs: String,
    pub labels: String,
    pub samples: usize,
    /// Every variant's output on every sample: FP32 little-endian, `[variant, sample, class]`
    /// in the order of the labels file's variant columns (what the simulator fuses).
    #[serde(default)]
    pub probabilities: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    task: String,
    modality: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default = "default_max_batch")]
    max_batch_size: u32,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    variants: Vec<VariantSpec>,
    eval: Option<EvalSpec>,
    #[serde(default)]
    engine: Option<Engine>,
    #[serde(default)]
    explain: Option<ExplainSpec>,
}

/// How an occlusion explanation cuts a sample (`[explain]` in `model.toml`): a grid over the
/// per-sample shape, one patch per cell, each masked in turn.
///
/// ```toml
/// [explain]
/// grid = [4, 4]      # an 8x8 image in 16 patches of 2x2 pixels
/// baseline = 0.0     # the value a masked element takes (in the input's datatype)
/// fill = "value"     # or "quietest": a masked patch takes the content of the sample's
///                    # lowest-energy patch (its noise floor) instead of the baseline
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExplainSpec {
    pub grid: Vec<i64>,
    #[serde(default)]
    pub baseline: f64,
    #[serde(default)]
    pub fill: Fill,
}

/// What a masked patch holds.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// Every element the `baseline` value: right where the baseline is what absence looks
    /// like (an image's blank background).
    #[default]
    Value,
    /// The sample's own lowest-energy patch, element by element (cyclically when patches
    /// differ in size): right for signals that always carry a noise floor, where exact
    /// digital silence is a perturbation the model never saw and reads as evidence itself.
    Quietest,
}

impl ExplainSpec {
    /// Patches per sample.
    pub fn patches(&self) -> usize {
        self.grid.iter().product::<i64>().max(0) as usize
    }
}

/// The engine a model's variants run on (`engine = "tract" | "onnxruntime"` in `model.toml`).
/// Absent: tract, falling back to onnxruntime (with a log line) when tract cannot load a
/// variant and the onnxruntime library is available. Named: that engine only.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Tract,
    Onnxruntime,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Tract => "tract",
            Engine::Onnxruntime => "onnxruntime",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_max_batch() -> u32 {
    32
}

/// A parsed, validated model folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Folder name; what clients address.
    pub name: String,
    pub dir: PathBuf,
    pub task: String,
    pub modality: String,
    pub description: String,
    pub labels: Vec<String>,
    pub max_batch_size: u32,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub variants: Vec<VariantSpec>,
    pub eval: Option<EvalSpec>,
    /// `None`: tract with fallback to onnxruntime; see [`Engine`].
    pub engine: Option<Engine>,
    /// Occlusion explanations of the first input, when declared.
    pub explain: Option<ExplainSpec>,
}

impl ModelSpec {
    /// Parses `<dir>/model.toml`. `name` is the folder name.
    pub fn load(dir: &Path) -> Result<ModelSpec> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid(format!("{}: not a valid folder name", dir.display())))?
            .to_string();
        let path = dir.join("model.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        ModelSpec::parse(&name, dir, &text, &path)
    }

    pub fn parse(name: &str, dir: &Path, text: &str, path: &Path) -> Result<ModelSpec> {
        let where_ = path.display();
        if !is_valid_name(name) {
            return Err(Error::invalid(format!(
                "{where_}: model name '{name}' must be 1-64 characters of [A-Za-z0-9_.-] starting alphanumeric"
            )));
        }
        let f: ModelFile = toml::from_str(text).map_err(|e| toml_error(text, path, &e))?;
        let bad = |msg: String| Error::invalid(format!("{where_}: {msg}"));
        if f.inputs.is_empty() || f.outputs.is_empty() {
            return Err(bad("a model needs at least one input and one output".into()));
        }
        for t in f.inputs.iter().chain(&f.outputs) {
            if t.shape.first() != Some(&-1) {
                return Err(bad(format!("tensor '{}': the first dimension must be -1 (batch)", t.name)));
            }
            if t.shape[1..].iter().any(|&d| d < 1) {
                return Err(bad(format!("tensor '{}': only the batch dimension may be -1", t.name)));
            }
        }
        if f.variants.is_empty() {
            return Err(bad("a model needs at least one [[variants]] entry".into()));
        }
        if f.max_batch_size == 0 {
            return Err(bad("max_batch_size must be at least 1".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for v in &f.variants {
            if !is_valid_name(&v.name) {
                return Err(bad(format!("variant name '{}' is not a valid name", v.name)));
            }
            if !seen.insert(v.name.clone()) {
                return Err(bad(format!("variant '{}' is declared twice", v.name)));
            }
            if !(0.0..=1.0).contains(&v.accuracy) {
                return Err(bad(format!("variant '{}': accuracy must be within 0..1", v.name)));
            }
            if !v.class_accuracy.is_empty() && v.class_accuracy.len() != f.labels.len() {
                return Err(bad(format!(
                    "variant '{}': class_accuracy has {} entries for {} labels",
                    v.name,
                    v.class_accuracy.len(),
                    f.labels.len()
                )));
            }
            if v.threads == 0 {
                return Err(bad(format!("variant '{}': threads must be at least 1", v.name)));
            }
            resolve_inside(dir, &v.file).map_err(|e| bad(e.message))?;
        }
        if let Some(x) = &f.explain {
            let sample = &f.inputs[0].shape[1..];
            if x.grid.len() != sample.len()
                || x.grid.iter().zip(sample).any(|(&g, &d)| g < 1 || g > d)
                || !x.baseline.is_finite()
            {
                return Err(bad(format!(
                    "[explain] grid {:?} must have one count per dimension of input '{}' {:?}, each within 1..=that \
                     dimension, and a finite baseline",
                    x.grid, f.inputs[0].name, sample
                )));
            }
        }
        if let Some(ev) = &f.eval {
            resolve_inside(dir, &ev.inputs).map_err(|e| bad(e.message))?;
            resolve_inside(dir, &ev.labels).map_err(|e| bad(e.message))?;
        }
        Ok(ModelSpec {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            task: f.task,
            modality: f.modality,
            description: f.description,
            labels: f.labels,
            max_batch_size: f.max_batch_size,
            inputs: f.inputs,
            outputs: f.outputs,
            variants: f.variants,
            eval: f.eval,
            engine: f.engine,
            explain: f.explain,
        })
    }

    pub fn variant(&self, name: &str) -> Option<&VariantSpec> {
        self.variants.iter().find(|v| v.name == name)
    }

    pub fn variant_path(&self, v: &VariantSpec) -> Result<PathBuf> {
        resolve_inside(&self.dir, &v.file)
    }

    /// Loads the held-out evaluation set, if the model has one.
    pub fn load_eval(&self) -> Result<Option<EvalSet>> {
        let Some(ev) = &self.eval else {
            return Ok(None);
        };
        EvalSet::load(self, ev).map(Some)
    }
}

/// A TOML error as `file:line: message`.
pub fn toml_error(text: &str, path: &Path, e: &toml::de::Error) -> Error {
    match e.span() {
        Some(s) => {
            let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
            Error::invalid(format!("{}:{line}: {}", path.display(), e.message()))
        }
        None => Error::invalid(format!("{}: {}", path.display(), e.message())),
    }
}

/// Resolves `rel` against `dir`, refusing absolute paths, `..` and symlinks that escape `dir`.
pub fn resolve_inside(dir: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(Error::invalid(format!(
            "path '{rel}' must be relative and stay inside the model folder"
        )));
    }
    let full = dir.join(p);
    let canon = full.canonicalize().map_err(|e| Error::invalid(format!("{}: {e}", full.display())))?;
    let root = dir.canonicalize().map_err(|e| Error::invalid(format!("{}: {e}", dir.display())))?;
    if !canon.starts_with(&root) {
        return Err(Error::invalid(format!("path '{rel}' resolves outside the model folder")));
    }
    Ok(canon)
}

/// One problem found while scanning a repository; the model is skipped, the others load.
#[derive(Debug, Clone)]
pub struct RepositoryProblem {
    pub model: String,
    pub error: Error,
}

/// Scans every sub-folder of `root` that holds a `model.toml`. Broken folders are reported, not
/// fatal. Models come back sorted by name.
pub fn scan_repository(root: &Path) -> Result<(Vec<ModelSpec>, Vec<RepositoryProblem>)> {
    let (mut models, problems) = scan_folders(root, "model.toml", ModelSpec::load)?;
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((models, problems))
}

/// Loads every sub-folder of `root` that holds `marker` with `load`; a folder that fails is
/// reported (sorted by name), not fatal.
pub fn scan_folders<T>(
    root: &Path,
    marker: &str,
    load: impl Fn(&Path) -> Result<T>,
) -> Result<(Vec<T>, Vec<RepositoryProblem>)> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| Error::invalid(format!("model repository {}: {e}", root.display())))?;
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() || !dir.join(marker).exists() {
            continue;
        }
        match load(&dir) {
            Ok(m) => found.push(m),
            Err(error) => problems
                .push(RepositoryProblem { model: entry.file_name().to_string_lossy().into_owned(), error }),
        }
    }
    problems.sort_by(|a, b| a.model.cmp(&b.model));
    Ok((found, problems))
}

/// A held-out evaluation set: inputs as raw tensor bytes, labels, and each variant's
/// per-sample correctness (what data-aware estimators and the simulator learn from).
#[derive(Debug, Clone)]
pub struct EvalSet {
    pub input: TensorSpec,
    /// All samples' bytes, concatenated row-major.
    pub inputs: Vec<u8>,
    pub labels: Vec<u32>,
    /// `correct[v][i]`: variant `variants[v]` was right on sample `i`.
    pub variants: Vec<String>,
    pub correct: Vec<Vec<bool>>,
    /// Each sample's difficulty grade (0 = easiest), when the labels file has a `severity`
    /// column.
    pub severity: Option<Vec<u32>>,
    /// `probabilities[v]`: variant `variants[v]`'s class probabilities, `classes` per sample,
    /// when the evaluation set keeps them.
    pub probabilities: Option<Vec<Vec<f32>>>,
    pub classes: usize,
}

impl EvalSet {
    fn load(model: &ModelSpec, ev: &EvalSpec) -> Result<EvalSet> {
        let input = model.inputs[0].clone();
        let sample_bytes = input.sample_elements() * input.datatype.size();
        let inputs_path = resolve_inside(&model.dir, &ev.inputs)?;
        let inputs = std::fs::read(&inputs_path)
            .map_err(|e| Error::invalid(format!("{}: {e}", inputs_path.display())))?;
        if inputs.len() != sample_bytes * ev.samples {
            return Err(Error::invalid(format!(
                "{}: {} bytes, expected {} samples x {sample_bytes} bytes",
                inputs_path.display(),
                inputs.len(),
                ev.samples
            )));
        }
        let labels_path = resolve_inside(&model.dir, &ev.labels)?;
        let text = std::fs::read_to_string(&labels_path)
            .map_err(|e| Error::invalid(format!("{}: {e}", labels_path.display())))?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
        let variants: Vec<String> = model
            .variants
            .iter()
            .filter(|v| header.contains(&v.name.as_str()))
            .map(|v| v.name.clone())
            .collect();
        let cols: Vec<usize> = variants.iter().filter_map(|v| header.iter().position(|h| h == v)).collect();
        let label_col = header
            .iter()
            .position(|h| *h == "label")
            .ok_or_else(|| Error::invalid(format!("{}: no 'label' column", labels_path.display())))?;
        let severity_col = header.iter().position(|h| *h == "severity");
        let mut labels = Vec::new();
        let mut severity = Vec::new();
        let mut correct = vec![Vec::new(); variants.len()];
        for (n, line) in lines.enumerate() {
            let f: Vec<&str> = line.split(',').collect();
            let bad = || Error::invalid(format!("{}:{}: malformed row", labels_path.display(), n + 2));
            labels.push(f.get(label_col).and_then(|s| s.parse().ok()).ok_or_else(bad)?);
            for (k, &c) in cols.iter().enumerate() {
                correct[k].push(f.get(c).ok_or_else(bad)?.trim() == "1");
            }
            if let Some(c) = severity_col {
                severity.push(f.get(c).and_then(|s| s.trim().parse().ok()).ok_or_else(bad)?);
            }
        }
        if labels.len() != ev.samples {
            return Err(Error::invalid(format!(
                "{}: {} rows, expected {}",
                labels_path.display(),
                labels.len(),
                ev.samples
            )));
        }
        let classes = model.labels.len();
        let probabilities = match &ev.probabilities {
            None => None,
            Some(file) => {
                let path = resolve_inside(&model.dir, file)?;
                let bytes =
                    std::fs::read(&path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
                // Columns of the labels file, in its order: the file's variant axis.
                let in_file: Vec<&str> =
                    header.iter().copied().filter(|h| model.variants.iter().any(|v| v.name == *h)).collect();
                let want = in_file.len() * ev.samples * classes * 4;
                if classes == 0 || bytes.len() != want {
                    return Err(Error::invalid(format!(
                        "{}: {} bytes, expected {} variants x {} samples x {classes} classes x 4",
                        path.display(),
                        bytes.len(),
                        in_file.len(),
                        ev.samples
                    )));
                }
                let all: Vec<f32> =
                    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                let per = ev.samples * classes;
                let of = |v: &String| {
                    in_file.iter().position(|h| h == v).map(|k| all[k * per..(k + 1) * per].to_vec())
                };
                Some(variants.iter().filter_map(of).collect())
            }
        };
        let severity = severity_col.map(|_| severity);
        Ok(EvalSet { input, inputs, labels, variants, correct, severity, probabilities, classes })
    }

    /// Variant `v`'s class probabilities on sample `i`, when the set keeps them.
    pub fn probabilities(&self, v: usize, i: usize) -> Option<&[f32]> {
        let p = self.probabilities.as_ref()?.get(v)?;
        p.get(i * self.classes..(i + 1) * self.classes)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of sample `i`.
    pub fn sample(&self, i: usize) -> &[u8] {
        let n = self.inputs.len() / self.labels.len().max(1);
        &self.inputs[i * n..(i + 1) * n]
    }

    /// The held-out half: odd sample indices. `osprey train-estimator` trains each model's
    /// `estimator.json` on the even half, so serving, load generation and the simulator draw
    /// inputs from these only (a one-sample set holds out its only sample).
    pub fn held_out(&self) -> Vec<usize> {
        let odd: Vec<usize> = (1..self.len()).step_by(2).collect();
        if odd.is_empty() { (0..self.len()).collect() } else { odd }
    }

    /// What [`EvalSet::held_out`] is, for reports.
    pub const HELD_OUT: &'static str =
        "held-out half of the evaluation set (odd samples; estimators train on the even half)";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_is_the_odd_half() {
        let spec = TensorSpec { name: "x".into(), datatype: DataType::Fp32, shape: vec![-1, 1] };
        let ev = |n: usize| EvalSet {
            input: spec.clone(),
            inputs: vec![0; 4 * n],
            labels: vec![0; n],
            variants: vec![],
            correct: vec![],
            severity: None,
            probabilities: None,
            classes: 1,
        };
        assert_eq!(ev(5).held_out(), vec![1, 3]);
        assert!(ev(10).held_out().iter().all(|i| i % 2 == 1), "never the even (training) half");
        assert_eq!(ev(1).held_out(), vec![0]);
    }

    #[test]
    fn bundled_evaluation_sets_keep_grades_and_every_variants_output() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        for name in ["digits", "spoken_digits"] {
            let spec = ModelSpec::load(&dir.join(name)).unwrap();
            let ev = spec.load_eval().unwrap().unwrap();
            assert_eq!(ev.variants, ["small", "medium", "large"], "{name}");
            let grades = ev.severity.as_ref().expect("a severity column");
            assert!(grades.contains(&0) && grades.iter().any(|&g| g >= 3), "{name}: easy and hard");
            // The kept outputs agree with the correctness columns: argmax = label iff right.
            for v in 0..ev.variants.len() {
                for i in 0..ev.len() {
                    let p = ev.probabilities(v, i).expect("probabilities kept");
                    let top = (0..p.len()).fold(0, |b, k| if p[k] > p[b] { k } else { b });
                    assert_eq!(top as u32 == ev.labels[i], ev.correct[v][i], "{name} {v} {i}");
                    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-3);
                }
            }
            // A hard input the largest variant gets right and the smallest does not exists.
            assert!((0..ev.len()).any(|i| ev.correct[2][i] && !ev.correct[0][i]), "{name}");
        }
    }

    const GOOD: &str = r#"
task = "t"
modality = "image"
labels = ["a", "b"]
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 2]
[[variants]]
name = "small"
file = "small.onnx"
accuracy = 0.5
"#;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("osprey-core-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("small.onnx"), b"x").unwrap();
        d
    }

    #[test]
    fn names_follow_the_strict_pattern() {
        for ok in ["digits", "a", "m-1.v2", "X_y"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "../x", ".hidden", "a/b", "a..b", "é", &"a".repeat(65), "a b"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_engine_key_names_tract_or_onnxruntime_and_is_absent_by_default() {
        let d = tmp("engine");
        let parse = |t: &str| ModelSpec::parse("m", &d, t, &d.join("model.toml"));
        assert_eq!(parse(GOOD).unwrap().engine, None);
        let on = |e: &str| format!("engine = \"{e}\"\n{GOOD}");
        assert_eq!(parse(&on("onnxruntime")).unwrap().engine, Some(Engine::Onnxruntime));
        assert_eq!(parse(&on("tract")).unwrap().engine, Some(Engine::Tract));
        let e = parse(&on("tensorrt")).unwrap_err();
        assert!(e.message.contains("model.toml:1:") && e.message.contains("tensorrt"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors_with_file_and_line() {
        let d = tmp("unknown");
        let text = GOOD.replace("accuracy = 0.5", "accuracy = 0.5\ncolour = \"red\"");
        let e = ModelSpec::parse("m", &d, &text, &d.join("model.toml")).unwrap_err();
        assert!(e.message.contains("model.toml:17:"), "{e}");
        assert!(e.message.contains("colour"), "{e}");
    }

    #[test]
    fn variant_files_must_stay_inside_the_folder() {
        let d = tmp("escape");
        let text = GOOD.replace("file = \"small.onnx\"", "file = \"../small.onnx\"");
        let e = ModelSpec::parse("m", &d, &text, &d.join("model.toml")).unwrap_err();
        assert!(e.message.contains("stay inside"), "{e}");
        let text = GOOD.replace("file = \"small.onnx\"", "file = \"/etc/passwd\"");
        assert!(ModelSpec::parse("m", &d, &text, &d.join("model.toml")).is_err());
        assert!(ModelSpec::parse("m", &d, GOOD, &d.join("model.toml")).is_ok());
    }

    #[test]
    fn a_broken_folder_is_reported_and_the_others_load() {
        let root = std::env::temp_dir().join(format!("osprey-core-repo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (name, text) in
            [("good", GOOD.to_string()), ("broken", GOOD.replace("[[variants]]", "[[variantz]]"))]
        {
            let d = root.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("small.onnx"), b"x").unwrap();
            std::fs::write(d.join("model.toml"), text).unwrap();
        }
        let (models, problems) = scan_repository(&root).unwrap();
        assert_eq!(models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["good"]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].model, "broken");
    }

    #[test]
    fn bundled_zoo_parses_with_eval_sets() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let (models, problems) = scan_repository(&root).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(models.len() >= 2);
        for m in &models {
            assert!(m.variants.len() >= 3, "{}", m.name);
            let ev = m.load_eval().unwrap().expect("bundled models carry an eval set");
            assert_eq!(ev.variants.len(), m.variants.len());
            // The profiled accuracy in model.toml is the eval set's mean correctness.
            for (k, v) in ev.variants.iter().enumerate() {
                let mean = ev.correct[k].iter().filter(|&&c| c).count() as f64 / ev.len() as f64;
                assert!((mean - m.variant(v).unwrap().accuracy).abs() < 1e-3, "{}/{v}", m.name);
            }
        }
    }
}
