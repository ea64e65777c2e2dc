//! Split models (`split.toml`): a transformer served as one model whose contiguous layer
//! ranges run on different agents. The file names the graph, its tokenizer, the sequence
//! length it runs at, the nodes that end each unit (unit 0 the embedding, then one per
//! layer), the privacy rule (how many leading units stay on nodes of the trusted zone) and the
//! planner's objective and revision band.

use crate::error::{Error, Result};
use crate::model::{RepositoryProblem, is_valid_name, resolve_inside, toml_error};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitFile {
    #[serde(default)]
    task: String,
    #[serde(default)]
    modality: String,
    #[serde(default)]
    description: String,
    file: String,
    tokenizer: String,
    seq_len: usize,
    hidden: usize,
    boundaries: Vec<String>,
    #[serde(default = "default_batch")]
    max_batch_size: u32,
    /// How the weights are added when `file` is absent (shown to the operator).
    #[serde(default)]
    fetch: String,
    #[serde(default)]
    privacy: PrivacyFile,
    #[serde(default)]
    plan: PlanFile,
}

fn default_batch() -> u32 {
    16
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivacyFile {
    #[serde(default = "default_label")]
    label: String,
    #[serde(default = "default_zone")]
    zone: String,
    #[serde(default)]
    private_units: usize,
}

impl Default for PrivacyFile {
    fn default() -> Self {
        PrivacyFile { label: default_label(), zone: default_zone(), private_units: 0 }
    }
}

fn default_label() -> String {
    "zone".into()
}
fn default_zone() -> String {
    "trusted".into()
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default = "default_objective")]
    objective: String,
    #[serde(default = "default_strategy")]
    strategy: String,
    #[serde(default = "default_threshold")]
    threshold: f64,
    #[serde(default = "default_gain")]
    min_gain: f64,
}

impl Default for PlanFile {
    fn default() -> Self {
        PlanFile {
            objective: default_objective(),
            strategy: default_strategy(),
            threshold: default_threshold(),
            min_gain: default_gain(),
        }
    }
}

fn default_objective() -> String {
    "latency".into()
}
fn default_strategy() -> String {
    "planner".into()
}
fn default_threshold() -> f64 {
    0.5
}
fn default_gain() -> f64 {
    0.1
}

/// A parsed `split.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSpec {
    pub name: String,
    pub dir: PathBuf,
    pub task: String,
    pub modality: String,
    pub description: String,
    pub file: String,
    pub tokenizer: String,
    pub seq_len: usize,
    pub hidden: usize,
    pub boundaries: Vec<String>,
    pub max_batch_size: u32,
    pub fetch: String,
    /// Node label key and value of the trusted zone.
    pub trusted_label: (String, String),
    /// Units `[0, private_units)` run only in the trusted zone.
    pub private_units: usize,
    /// `latency` or `throughput`.
    pub objective: String,
    /// `planner`, `even`, `memory-weighted` or `single-node`.
    pub strategy: String,
    pub threshold: f64,
    pub min_gain: f64,
}

impl SplitSpec {
    pub fn load(dir: &Path) -> Result<SplitSpec> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid(format!("{}: not a valid folder name", dir.display())))?
            .to_string();
        let path = dir.join("split.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        SplitSpec::parse(&name, dir, &text, &path)
    }

    pub fn parse(name: &str, dir: &Path, text: &str, path: &Path) -> Result<SplitSpec> {
        let bad = |msg: String| Error::invalid(format!("{}: {msg}", path.display()));
        if !is_valid_name(name) {
            return Err(bad(format!("model name '{name}' is not a valid name")));
        }
        let f: SplitFile = toml::from_str(text).map_err(|e| toml_error(text, path, &e))?;
        if f.boundaries.is_empty() {
            return Err(bad("boundaries: at least one unit".into()));
        }
        if f.seq_len < 2 || f.seq_len > 512 || f.hidden == 0 || f.hidden > 16384 {
            return Err(bad("seq_len must be within 2..=512 and hidden within 1..=16384".into()));
        }
        if f.privacy.private_units > f.boundaries.len() {
            return Err(bad(format!(
                "privacy.private_units {} exceeds the {} units",
                f.privacy.private_units,
                f.boundaries.len()
            )));
        }
        if !["latency", "throughput"].contains(&f.plan.objective.as_str()) {
            return Err(bad(format!("plan.objective '{}': latency or throughput", f.plan.objective)));
        }
        if !["planner", "even", "memory-weighted", "single-node"].contains(&f.plan.strategy.as_str()) {
            return Err(bad(format!(
                "plan.strategy '{}': planner, even, memory-weighted or single-node",
                f.plan.strategy
            )));
        }
        if !(f.plan.threshold > 0.0 && f.plan.min_gain >= 0.0 && f.plan.min_gain < 1.0) {
            return Err(bad("plan.threshold must be > 0 and plan.min_gain within [0, 1)".into()));
        }
        if f.max_batch_size == 0 {
            return Err(bad("max_batch_size must be at least 1".into()));
        }
        // The graph may be absent (fetched later): only its form is checked here.
        for rel in [&f.file, &f.tokenizer] {
            let p = Path::new(rel);
            if p.is_absolute() || p.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(bad(format!("path '{rel}' must be relative and stay inside the model folder")));
            }
        }
        Ok(SplitSpec {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            task: f.task,
            modality: f.modality,
            description: f.description,
            file: f.file,
            tokenizer: f.tokenizer,
            seq_len: f.seq_len,
            hidden: f.hidden,
            boundaries: f.boundaries,
            max_batch_size: f.max_batch_size,
            fetch: f.fetch,
            trusted_label: (f.privacy.label, f.privacy.zone),
            private_units: f.privacy.private_units,
            objective: f.plan.objective,
            strategy: f.plan.strategy,
            threshold: f.plan.threshold,
            min_gain: f.plan.min_gain,
        })
    }

    pub fn units(&self) -> usize {
        self.boundaries.len()
    }

    pub fn graph_path(&self) -> Result<PathBuf> {
        resolve_inside(&self.dir, &self.file)
    }

    pub fn tokenizer_path(&self) -> Result<PathBuf> {
        resolve_inside(&self.dir, &self.tokenizer)
    }

    /// Why the model cannot be served from this folder yet (its weights absent), if so.
    pub fn missing(&self) -> Option<String> {
        let graph = self.dir.join(&self.file);
        (!graph.exists()).then(|| {
            let how =
                if self.fetch.is_empty() { String::new() } else { format!("; add it with: {}", self.fetch) };
            format!("{} is not present{how}", graph.display())
        })
    }
}

/// Every sub-folder of `root` holding a `split.toml`, sorted by name; broken ones reported.
pub fn scan_splits(root: &Path) -> Result<(Vec<SplitSpec>, Vec<RepositoryProblem>)> {
    let (mut specs, problems) = crate::model::scan_folders(root, "split.toml", SplitSpec::load)?;
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((specs, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_split_model_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/minilm");
        let s = SplitSpec::load(&dir).unwrap();
        assert_eq!(s.units(), 7);
        assert_eq!(s.private_units, 2);
        assert_eq!(s.trusted_label, ("zone".into(), "trusted".into()));
    }

    #[test]
    fn bad_split_files_are_refused_with_the_reason() {
        let dir = Path::new("/tmp");
        let p = Path::new("/tmp/split.toml");
        let base = "file = \"m.onnx\"\ntokenizer = \"t.json\"\nseq_len = 32\nhidden = 8\nboundaries = [\"a\", \"b\"]\n";
        assert!(SplitSpec::parse("m", dir, base, p).is_ok());
        let e = SplitSpec::parse("m", dir, &format!("{base}[privacy]\nprivate_units = 3\n"), p).unwrap_err();
        assert!(e.message.contains("exceeds"), "{}", e.message);
        let e = SplitSpec::parse("m", dir, &format!("{base}[plan]\nobjective = \"speed\"\n"), p).unwrap_err();
        assert!(e.message.contains("latency or throughput"));
        assert!(SplitSpec::parse("m", dir, &base.replace("m.onnx", "../x.onnx"), p).is_err());
        let s = SplitSpec::parse("m", dir, &base.replace("m.onnx", "absent-graph.onnx"), p).unwrap();
        assert!(s.missing().unwrap().contains("not present"));
    }
}
