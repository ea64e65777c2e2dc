//! Multi-modal models in the repository, and tenants' quality objectives over them.
//!
//! A multi-modal model is a folder with a `multimodal.toml` naming, per modality, a classifier
//! of the repository that observes the same event classes through that modality (its variants
//! are the modality's variants), and the fusion rules the model supports:
//!
//! ```toml
//! description = "one event seen by a camera and heard by a microphone"
//! output = "probabilities"            # each member's class-probability output; the fused one
//! fusion = ["product", "weighted_average", "average"]   # the first is the default
//! [[modalities]]
//! name = "image"
//! model = "digits"                    # its inputs are this modality's inputs
//! [[modalities]]
//! name = "audio"
//! model = "spoken_digits"
//! ```
//!
//! A request to it carries the inputs of one or more modalities (all inputs of each modality
//! it carries), and is answered by the cross-modal refinement of `osprey_policy::refine`
//! under the tenant's [`QualityObjective`]. [`MultiModalSpec::check`] verifies the members
//! against the repository: every member exists, all have the same labels, each has an FP32
//! output named `output` of shape `[-1, labels]`, and no two modalities share an input name
//! (a request's tensor names say which modality they belong to).

use crate::error::{Error, Result};
use crate::model::{ModelSpec, RepositoryProblem, is_valid_name, toml_error};
use crate::tensor::DataType;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// How the answers of several modalities or variants become one.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fusion {
    /// Product of the calibrated class probabilities, renormalised (independent observations,
    /// equal class priors; Kittler et al. 1998, the product rule).
    Product,
    /// Mean of the answers, each weighted by its variant's held-out accuracy on the class it
    /// predicts (Kittler et al.'s weighted sum rule with per-class weights).
    WeightedAverage,
    /// Plain mean of the answers (what ROHE's aggregation does).
    Average,
}

impl Fusion {
    pub fn as_str(self) -> &'static str {
        match self {
            Fusion::Product => "product",
            Fusion::WeightedAverage => "weighted_average",
            Fusion::Average => "average",
        }
    }
}

/// Which service refines an answer next (the names ROHE's ensemble selectors have).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EnsembleStrategy {
    /// The remaining service with the highest estimated accuracy.
    SelectByOverallAccuracy,
    /// The remaining service most accurate on the top-K classes of the answer so far.
    #[default]
    EnhanceConfidence,
    /// The remaining service most accurate on the worst-K classes of the answer so far.
    EnhanceGeneralization,
}

impl EnsembleStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            EnsembleStrategy::SelectByOverallAccuracy => "select_by_overall_accuracy",
            EnsembleStrategy::EnhanceConfidence => "enhance_confidence",
            EnsembleStrategy::EnhanceGeneralization => "enhance_generalization",
        }
    }
}

/// When a tenant's multi-modal answers come with an explanation.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExplainWhen {
    Never,
    /// When the request asks (parameter `explain`, or the `explanation` output named).
    #[default]
    Requested,
    Always,
}

/// What happens to an explanation that cannot fit the time budget.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExplainMiss {
    /// Answer without it (the response says it was skipped and why).
    #[default]
    Skip,
    /// Refuse the request at admission (504) unless an answer and its explanation both fit.
    Refuse,
}

/// How multi-modal requests are answered (`[scheduler] multimodal`): the quality-driven
/// refinement of `osprey_policy::refine`, or one of the baselines it is measured against.
/// `osprey_policy::refine::plan` turns a policy into the calls of one request; the live gateway
/// and the simulator both go through it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MultiModalPolicy {
    /// The cheapest service that can meet the target first, then refinement while the fused
    /// confidence is below the tenant's target and time allows.
    #[default]
    QualityDriven,
    /// The same first answer, never refined (`max_ensemble = 1`).
    NoRefinement,
    /// One call, to the most accurate service by its estimate that fits the whole budget
    /// (single-modality profiled selection with the profiled estimator).
    Profiled,
    /// Every carried modality at once on its most accurate variant by profile, fused by the
    /// tenant's rule when all have answered.
    FixedEnsemble,
    /// ROHE's legacy orchestrators: every carried modality at once, the variant left to the
    /// member model's scheduling rule (set `[scheduler] policy` to the same name), the
    /// answers averaged.
    Edf,
    Llf,
    Dream,
    /// Hindsight upper bound (the simulator only: it knows each input's correctness).
    Oracle,
}

impl MultiModalPolicy {
    pub const ALL: [MultiModalPolicy; 8] = [
        MultiModalPolicy::QualityDriven,
        MultiModalPolicy::NoRefinement,
        MultiModalPolicy::Profiled,
        MultiModalPolicy::FixedEnsemble,
        MultiModalPolicy::Edf,
        MultiModalPolicy::Llf,
        MultiModalPolicy::Dream,
        MultiModalPolicy::Oracle,
    ];

    pub fn parse(s: &str) -> Option<MultiModalPolicy> {
        MultiModalPolicy::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MultiModalPolicy::QualityDriven => "quality-driven",
            MultiModalPolicy::NoRefinement => "no-refinement",
            MultiModalPolicy::Profiled => "profiled",
            MultiModalPolicy::FixedEnsemble => "fixed-ensemble",
            MultiModalPolicy::Edf => "edf",
            MultiModalPolicy::Llf => "llf",
            MultiModalPolicy::Dream => "dream",
            MultiModalPolicy::Oracle => "oracle",
        }
    }

    /// The member models' scheduling rule this policy is measured with (the simulator sets
    /// it; live, `[scheduler] policy`).
    pub fn member_rule(self) -> crate::config::PolicyName {
        use crate::config::PolicyName;
        match self {
            MultiModalPolicy::QualityDriven | MultiModalPolicy::NoRefinement | MultiModalPolicy::Oracle => {
                PolicyName::DataAware
            }
            MultiModalPolicy::Profiled | MultiModalPolicy::FixedEnsemble => PolicyName::Profiled,
            MultiModalPolicy::Edf => PolicyName::Edf,
            MultiModalPolicy::Llf => PolicyName::Llf,
            MultiModalPolicy::Dream => PolicyName::Dream,
        }
    }
}

/// A tenant's quality objective for multi-modal requests (`[tenants.quality]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QualityObjective {
    /// Modalities this tenant's requests may use; empty: all the model has.
    pub modalities: Vec<String>,
    /// Most answers fused into one (the first answer included); 1 disables refinement.
    pub max_ensemble: usize,
    pub strategy: EnsembleStrategy,
    /// The first answer comes from the cheapest service whose estimated accuracy for this
    /// input reaches this (else from the most accurate one that fits its share of time); the
    /// tenant's `accuracy_floor` and a request's `min_accuracy` raise it.
    pub min_accuracy: f64,
    /// Refinement goes on while the fused answer's confidence (its largest class
    /// probability, the smallest over the request's rows) is below this.
    pub min_confidence: f64,
    /// The time budget, milliseconds; default: the tenant's `latency_slo_ms`.
    pub time_budget_ms: Option<u64>,
    /// Share of the budget the first answer may take (by its expected latency); refinements
    /// use whatever is left up to the deadline.
    pub first_share: f64,
    /// Fusion rule; default: the model's first.
    pub fusion: Option<Fusion>,
    pub explain: ExplainWhen,
    pub explain_miss: ExplainMiss,
}

impl Default for QualityObjective {
    fn default() -> Self {
        QualityObjective {
            modalities: Vec::new(),
            max_ensemble: 2,
            strategy: EnsembleStrategy::default(),
            min_accuracy: 0.8,
            min_confidence: 0.9,
            time_budget_ms: None,
            first_share: 0.5,
            fusion: None,
            explain: ExplainWhen::default(),
            explain_miss: ExplainMiss::default(),
        }
    }
}

impl QualityObjective {
    /// Range checks; `Err` says which field is out of range.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.max_ensemble == 0 {
            return Err("quality.max_ensemble must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.min_accuracy) || !(0.0..=1.0).contains(&self.min_confidence) {
            return Err("quality.min_accuracy and quality.min_confidence must be within 0..1".into());
        }
        if !(self.first_share > 0.0 && self.first_share <= 1.0) {
            return Err("quality.first_share must be within (0, 1]".into());
        }
        if self.time_budget_ms == Some(0) {
            return Err("quality.time_budget_ms must be positive".into());
        }
        if let Some(m) = self.modalities.iter().find(|m| !is_valid_name(m)) {
            return Err(format!("quality.modalities: '{m}' is not a valid modality name"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModalityDecl {
    pub name: String,
    pub model: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiModalFile {
    #[serde(default)]
    description: String,
    #[serde(default = "default_output")]
    output: String,
    #[serde(default = "default_fusion")]
    fusion: Vec<Fusion>,
    modalities: Vec<ModalityDecl>,
    #[serde(default)]
    eval: Option<PairsSpec>,
}

/// `[eval]` of a multi-modal folder: the paired set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PairsSpec {
    /// CSV: `event,label,<modality>...,held_out`; each modality column is a sample index into
    /// that modality's model's evaluation set (of the same class); `held_out` is 1 where every
    /// sample is in the estimators' held-out half.
    pub pairs: String,
}

/// One paired event: one sample per modality, all of the same class.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedEvent {
    pub label: u32,
    /// Per modality (declaration order): the sample's index in that model's evaluation set.
    pub samples: Vec<usize>,
    pub held_out: bool,
}

fn default_output() -> String {
    "probabilities".into()
}

fn default_fusion() -> Vec<Fusion> {
    vec![Fusion::Product, Fusion::WeightedAverage, Fusion::Average]
}

/// A parsed multi-modal folder.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiModalSpec {
    /// Folder name; what clients address.
    pub name: String,
    pub dir: PathBuf,
    pub description: String,
    /// The members' class-probability output, and the fused output's name.
    pub output: String,
    /// Supported fusion rules, the default first.
    pub fusion: Vec<Fusion>,
    pub modalities: Vec<ModalityDecl>,
    pub eval: Option<PairsSpec>,
}

impl MultiModalSpec {
    pub fn load(dir: &Path) -> Result<MultiModalSpec> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid(format!("{}: not a valid folder name", dir.display())))?
            .to_string();
        let path = dir.join("multimodal.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        MultiModalSpec::parse(&name, dir, &text, &path)
    }

    pub fn parse(name: &str, dir: &Path, text: &str, path: &Path) -> Result<MultiModalSpec> {
        let bad = |what: String| Error::invalid(format!("{}: {what}", path.display()));
        if !is_valid_name(name) {
            return Err(bad(format!("'{name}' is not a valid model name")));
        }
        let f: MultiModalFile = toml::from_str(text).map_err(|e| toml_error(text, path, &e))?;
        if f.modalities.is_empty() {
            return Err(bad("a multi-modal model needs at least one [[modalities]]".into()));
        }
        if f.fusion.is_empty() {
            return Err(bad("fusion must name at least one rule".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &f.modalities {
            if !is_valid_name(&m.name) {
                return Err(bad(format!("'{}' is not a valid modality name", m.name)));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(bad(format!("modality '{}' appears twice", m.name)));
            }
        }
        Ok(MultiModalSpec {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            description: f.description,
            output: f.output,
            fusion: f.fusion,
            modalities: f.modalities,
            eval: f.eval,
        })
    }

    /// The paired set, when `[eval]` names one.
    pub fn load_pairs(&self) -> Result<Option<Vec<PairedEvent>>> {
        let Some(ev) = &self.eval else { return Ok(None) };
        let path = crate::model::resolve_inside(&self.dir, &ev.pairs)?;
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        parse_pairs(&text, &self.modalities)
            .map(Some)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
    }

    /// The member models in modality order, checked (see the module docs).
    pub fn check<'a>(&self, models: &'a [ModelSpec]) -> Result<Vec<&'a ModelSpec>> {
        let at = |what: String| Error::invalid(format!("multi-modal model '{}': {what}", self.name));
        let mut members: Vec<&ModelSpec> = Vec::new();
        for m in &self.modalities {
            let spec = models.iter().find(|s| s.name == m.model).ok_or_else(|| {
                at(format!("modality '{}' names model '{}', which the repository lacks", m.name, m.model))
            })?;
            if spec.labels.is_empty() {
                return Err(at(format!("model '{}' declares no labels; fusion needs them", spec.name)));
            }
            if let Some(first) = members.first()
                && first.labels != spec.labels
            {
                return Err(at(format!(
                    "models '{}' and '{}' have different labels; their answers cannot be fused",
                    first.name, spec.name
                )));
            }
            let out = spec
                .outputs
                .iter()
                .find(|o| o.name == self.output)
                .ok_or_else(|| at(format!("model '{}' has no output '{}'", spec.name, self.output)))?;
            if out.datatype != DataType::Fp32 || out.sample_shape() != [spec.labels.len() as i64] {
                return Err(at(format!(
                    "output '{}' of model '{}' must be FP32 [-1, {}] class probabilities",
                    self.output,
                    spec.name,
                    spec.labels.len()
                )));
            }
            for inp in &spec.inputs {
                if let Some(other) = members.iter().find(|o| o.inputs.iter().any(|i| i.name == inp.name)) {
                    return Err(at(format!(
                        "input '{}' belongs to both '{}' and '{}'; a request could not say which modality it is",
                        inp.name, other.name, spec.name
                    )));
                }
            }
            members.push(spec);
        }
        Ok(members)
    }
}

fn parse_pairs(text: &str, modalities: &[ModalityDecl]) -> std::result::Result<Vec<PairedEvent>, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').map(str::trim).collect();
    let col =
        |name: &str| header.iter().position(|h| *h == name).ok_or_else(|| format!("no '{name}' column"));
    let label = col("label")?;
    let held = col("held_out")?;
    let cols = modalities.iter().map(|m| col(&m.name)).collect::<std::result::Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let num = |c: usize| {
            f.get(c)
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| format!("line {}: malformed row", n + 2))
        };
        out.push(PairedEvent {
            label: num(label)? as u32,
            samples: cols.iter().map(|&c| num(c)).collect::<std::result::Result<_, _>>()?,
            held_out: num(held)? == 1,
        });
    }
    Ok(out)
}

/// Every sub-folder of `root` holding a `multimodal.toml`, sorted by name; broken ones reported.
pub fn scan_multimodal(root: &Path) -> Result<(Vec<MultiModalSpec>, Vec<RepositoryProblem>)> {
    let (mut specs, problems) = crate::model::scan_folders(root, "multimodal.toml", MultiModalSpec::load)?;
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((specs, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MultiModalSpec> {
        MultiModalSpec::parse("mm", Path::new("/r/mm"), text, Path::new("/r/mm/multimodal.toml"))
    }

    fn repo() -> Vec<ModelSpec> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        ["digits", "spoken_digits", "digits_denoise"]
            .iter()
            .map(|m| ModelSpec::load(&dir.join(m)).expect("a bundled model parses"))
            .collect()
    }

    #[test]
    fn the_bundled_multimodal_model_checks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digit_events");
        let spec = MultiModalSpec::load(&dir).expect("parses");
        let models = repo();
        let members = spec.check(&models).expect("checks");
        assert_eq!(members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["digits", "spoken_digits"]);
        assert_eq!(spec.fusion[0], Fusion::Product);
        // The paired set: same class in every modality, held-out events only on odd samples.
        let pairs = spec.load_pairs().expect("pairs parse").expect("the bundled model has pairs");
        let evals: Vec<_> = members.iter().map(|m| m.load_eval().unwrap().unwrap()).collect();
        assert!(pairs.len() >= 400, "{}", pairs.len());
        for p in &pairs {
            for (k, &i) in p.samples.iter().enumerate() {
                assert_eq!(evals[k].labels[i], p.label, "{p:?}");
                assert_eq!(i % 2 == 1, p.held_out, "{p:?}");
            }
        }
    }

    #[test]
    fn pairs_name_a_sample_per_modality() {
        let mods = vec![
            ModalityDecl { name: "image".into(), model: "a".into() },
            ModalityDecl { name: "audio".into(), model: "b".into() },
        ];
        let p = parse_pairs("event,label,audio,image,held_out\n0,3,7,9,1\n1,2,4,6,0\n", &mods).unwrap();
        assert_eq!(p[0], PairedEvent { label: 3, samples: vec![9, 7], held_out: true });
        assert!(!p[1].held_out);
        assert!(parse_pairs("event,label,image,held_out\n", &mods).unwrap_err().contains("'audio'"));
        assert!(
            parse_pairs("event,label,image,audio,held_out\n0,x,1,2,0\n", &mods)
                .unwrap_err()
                .contains("line 2")
        );
    }

    #[test]
    fn bad_declarations_say_what_is_wrong() {
        let models = repo();
        let e =
            parse("[[modalities]]\nname = \"a\"\nmodel = \"nope\"\n").unwrap().check(&models).unwrap_err();
        assert!(e.message.contains("lacks"), "{e}");
        let e = parse("[[modalities]]\nname = \"a\"\nmodel = \"digits\"\n[[modalities]]\nname = \"b\"\nmodel = \"digits\"\n")
            .unwrap()
            .check(&models)
            .unwrap_err();
        assert!(e.message.contains("belongs to both"), "{e}");
        let e = parse("[[modalities]]\nname = \"a\"\nmodel = \"digits_denoise\"\n")
            .unwrap()
            .check(&models)
            .unwrap_err();
        assert!(e.message.contains("no output") || e.message.contains("labels"), "{e}");
        assert!(parse("modalities = []\n").unwrap_err().message.contains("at least one"));
        assert!(
            parse(
                "[[modalities]]\nname = \"a\"\nmodel = \"x\"\n[[modalities]]\nname = \"a\"\nmodel = \"y\"\n"
            )
            .unwrap_err()
            .message
            .contains("twice")
        );
        assert!(parse("fusion = [\"vote\"]\n[[modalities]]\nname = \"a\"\nmodel = \"x\"\n").is_err());
    }

    #[test]
    fn objectives_are_range_checked() {
        assert!(QualityObjective::default().check().is_ok());
        let bad = [
            QualityObjective { max_ensemble: 0, ..Default::default() },
            QualityObjective { min_confidence: 1.5, ..Default::default() },
            QualityObjective { first_share: 0.0, ..Default::default() },
            QualityObjective { time_budget_ms: Some(0), ..Default::default() },
        ];
        for q in bad {
            assert!(q.check().is_err(), "{q:?}");
        }
    }
}
