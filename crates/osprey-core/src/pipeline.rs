//! Pipelines in the model repository: a folder with a `pipeline.toml` naming a linear chain of
//! stages, each stage a model of the repository (its variants are the stage's variants), and how
//! one stage's outputs feed the next stage's inputs.
//!
//! ```toml
//! description = "digits: denoise -> classify -> calibrate"
//! slo_ms = 50                      # end-to-end latency budget
//! [[stages]]
//! name = "denoise"
//! model = "digits_denoise"         # its inputs are the pipeline's inputs
//! [[stages]]
//! name = "classify"
//! model = "digits"
//! inputs = { image = "clean" }     # this stage's input <- the previous stage's output
//! ```
//!
//! [`PipelineSpec::check`] verifies the chain against the models: every stage's model exists,
//! every input of a later stage is mapped to an output of the stage before it (an input named
//! like an output maps implicitly), and datatypes and per-sample shapes agree.

use crate::error::{Error, Result};
use crate::model::{ModelSpec, is_valid_name, toml_error};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageDecl {
    pub name: String,
    pub model: String,
    /// This stage's input name -> the previous stage's output name.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    #[serde(default)]
    description: String,
    #[serde(default = "default_slo")]
    slo_ms: f64,
    stages: Vec<StageDecl>,
}

fn default_slo() -> f64 {
    100.0
}

/// A parsed pipeline folder.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSpec {
    /// Folder name; what clients address.
    pub name: String,
    pub dir: PathBuf,
    pub description: String,
    pub slo_ms: f64,
    pub stages: Vec<StageDecl>,
}

impl PipelineSpec {
    pub fn load(dir: &Path) -> Result<PipelineSpec> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid(format!("{}: not a valid folder name", dir.display())))?
            .to_string();
        let path = dir.join("pipeline.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        PipelineSpec::parse(&name, dir, &text, &path)
    }

    pub fn parse(name: &str, dir: &Path, text: &str, path: &Path) -> Result<PipelineSpec> {
        if !is_valid_name(name) {
            return Err(Error::invalid(format!("{}: '{name}' is not a valid pipeline name", path.display())));
        }
        let f: PipelineFile = toml::from_str(text).map_err(|e| toml_error(text, path, &e))?;
        if f.stages.is_empty() {
            return Err(Error::invalid(format!(
                "{}: a pipeline needs at least one [[stages]]",
                path.display()
            )));
        }
        if !(f.slo_ms.is_finite() && f.slo_ms > 0.0) {
            return Err(Error::invalid(format!("{}: slo_ms must be positive", path.display())));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &f.stages {
            if !seen.insert(s.name.as_str()) {
                return Err(Error::invalid(format!("{}: stage '{}' appears twice", path.display(), s.name)));
            }
        }
        if !f.stages[0].inputs.is_empty() {
            return Err(Error::invalid(format!(
                "{}: stage '{}' is the first; its inputs are the pipeline's and take no mapping",
                path.display(),
                f.stages[0].name
            )));
        }
        Ok(PipelineSpec {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            description: f.description,
            slo_ms: f.slo_ms,
            stages: f.stages,
        })
    }

    /// The stage models in order, checked as a chain (see the module docs).
    pub fn check<'a>(&self, models: &'a [ModelSpec]) -> Result<Vec<&'a ModelSpec>> {
        let at = |what: String| Error::invalid(format!("pipeline '{}': {what}", self.name));
        let mut chain: Vec<&ModelSpec> = Vec::new();
        for s in &self.stages {
            let m = models.iter().find(|m| m.name == s.model).ok_or_else(|| {
                at(format!("stage '{}' names model '{}', which the repository lacks", s.name, s.model))
            })?;
            if let Some(prev) = chain.last() {
                for inp in &m.inputs {
                    let from = s.inputs.get(&inp.name).unwrap_or(&inp.name);
                    let out = prev.outputs.iter().find(|o| &o.name == from).ok_or_else(|| {
                        at(format!(
                            "stage '{}' input '{}' maps to '{from}', which stage model '{}' does not output",
                            s.name, inp.name, prev.name
                        ))
                    })?;
                    if out.datatype != inp.datatype || out.sample_shape() != inp.sample_shape() {
                        return Err(at(format!(
                            "stage '{}' input '{}' is {} {:?} but '{}' gives {} {:?}",
                            s.name,
                            inp.name,
                            inp.datatype.as_str(),
                            inp.sample_shape(),
                            from,
                            out.datatype.as_str(),
                            out.sample_shape()
                        )));
                    }
                }
                for k in s.inputs.keys() {
                    if !m.inputs.iter().any(|i| &i.name == k) {
                        return Err(at(format!(
                            "stage '{}' maps '{k}', which model '{}' has no input of",
                            s.name, m.name
                        )));
                    }
                }
            }
            chain.push(m);
        }
        Ok(chain)
    }
}

/// A pipeline folder that could not be read: its name and why.
pub type BrokenPipeline = (String, Error);

/// Resource capacity and security limits (config `[resources]`, `[control.resources]`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// F_max: replicas per stage.
    pub f_max: u32,
    /// B_max: maximum batch size per stage.
    pub b_max: u32,
    /// W_max: memory of all replicas, MB.
    pub w_max: f64,
    /// Cores of all replicas' thread budgets.
    pub cores_max: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { f_max: 8, b_max: 32, w_max: 4096.0, cores_max: 16.0 }
    }
}

/// Eq. 3/4 weights (config `[objective]`), the paper's names.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    pub alpha: f64,
    pub beta: f64,
    pub gamma: f64,
    pub delta: f64,
    pub lambda: f64,
}

impl Default for Weights {
    fn default() -> Self {
        // Unmet demand costs far more than idle capacity (γ ≫ δ), and a core costs about as
        // much as a tenth of a stage's accuracy.
        Weights { alpha: 1.0, beta: 0.5, gamma: 4.0, delta: 0.6, lambda: 0.1 }
    }
}

/// Eq. 7 weights (config `[reward]`): the paper's β (cost) and γ (batch size) of the reward.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardWeights {
    pub beta: f64,
    pub gamma: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights { beta: 0.1, gamma: 0.002 }
    }
}

/// Every sub-folder of `root` with a `pipeline.toml`, sorted by name; broken ones as errors.
pub fn scan_pipelines(root: &Path) -> Result<(Vec<PipelineSpec>, Vec<BrokenPipeline>)> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| Error::invalid(format!("model repository {}: {e}", root.display())))?;
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() || !dir.join("pipeline.toml").exists() {
            continue;
        }
        match PipelineSpec::load(&dir) {
            Ok(p) => ok.push(p),
            Err(e) => bad.push((entry.file_name().to_string_lossy().into_owned(), e)),
        }
    }
    ok.sort_by(|a: &PipelineSpec, b| a.name.cmp(&b.name));
    bad.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((ok, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, input: &str, output: &str, dims: i64) -> ModelSpec {
        let text = format!(
            "task = \"t\"\nmodality = \"m\"\n[[inputs]]\nname = \"{input}\"\ndatatype = \"FP32\"\nshape = [-1, {dims}]\n\
             [[outputs]]\nname = \"{output}\"\ndatatype = \"FP32\"\nshape = [-1, {dims}]\n\
             [[variants]]\nname = \"a\"\nfile = \"a.onnx\"\naccuracy = 0.5\n"
        );
        let dir = std::env::temp_dir().join(format!("osprey-pipeline-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.onnx"), b"").unwrap();
        ModelSpec::parse(name, &dir, &text, &dir.join("model.toml")).unwrap()
    }

    fn parse(text: &str) -> Result<PipelineSpec> {
        PipelineSpec::parse("pipe", Path::new("/p"), text, Path::new("/p/pipeline.toml"))
    }

    #[test]
    fn a_chain_checks_and_mismatches_are_named() {
        let models = vec![model("a", "x", "y", 4), model("b", "in", "out", 4), model("c", "y", "z", 3)];
        let p = parse("[[stages]]\nname = \"one\"\nmodel = \"a\"\n[[stages]]\nname = \"two\"\nmodel = \"b\"\ninputs = { in = \"y\" }\n").unwrap();
        assert_eq!(p.check(&models).unwrap().len(), 2);
        let unmapped =
            parse("[[stages]]\nname = \"one\"\nmodel = \"a\"\n[[stages]]\nname = \"two\"\nmodel = \"b\"\n")
                .unwrap();
        let e = unmapped.check(&models).unwrap_err().to_string();
        assert!(e.contains("input 'in' maps to 'in'"), "{e}");
        let shape =
            parse("[[stages]]\nname = \"one\"\nmodel = \"a\"\n[[stages]]\nname = \"two\"\nmodel = \"c\"\n")
                .unwrap();
        let e = shape.check(&models).unwrap_err().to_string();
        assert!(e.contains("[3]") && e.contains("[4]"), "{e}");
        let missing = parse("[[stages]]\nname = \"one\"\nmodel = \"nope\"\n").unwrap();
        assert!(missing.check(&models).unwrap_err().to_string().contains("'nope'"));
        for m in &models {
            let _ = std::fs::remove_dir_all(&m.dir);
        }
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(parse("stages = []\n").is_err());
        assert!(parse("[[stages]]\nname = \"a\"\nmodel = \"a\"\ninputs = { x = \"y\" }\n").is_err());
        assert!(
            parse("[[stages]]\nname = \"a\"\nmodel = \"a\"\n[[stages]]\nname = \"a\"\nmodel = \"b\"\n")
                .is_err()
        );
        assert!(parse("slo_ms = -1\n[[stages]]\nname = \"a\"\nmodel = \"a\"\n").is_err());
        assert!(parse("bogus = 1\n[[stages]]\nname = \"a\"\nmodel = \"a\"\n").is_err());
    }
}
