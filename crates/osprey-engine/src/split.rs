//! A transformer cut at layer boundaries, so that contiguous ranges of its layers run on
//! different nodes (the adaptive LFM orchestration paper's split inference).
//!
//! The graph is parsed once ([`SplitGraph::open`]); [`SplitGraph::range`] builds the plan of
//! units `[a, b)`. Unit 0 is the embedding (token ids -> hidden state), unit `i >= 1` the
//! `i`-th encoder layer; `boundaries[i]` names the node whose output ends unit `i`. A range
//! that starts at 0 takes the raw token inputs (`input_ids`, `attention_mask`,
//! `token_type_ids`); any other takes the hidden state at its start and the attention mask
//! (what a layer boundary carries). Every range ends with the hidden state at its end.
//!
//! How a cut is made (tract): the whole model gets concrete input facts (batch 1, the
//! model's fixed sequence length), then the inputs are moved to the boundary node and the
//! attention mask, the output to the end boundary, and the graph is compacted *before* the new
//! input facts are set. With concrete shapes everything the cut-off embedding fed into the
//! later layers (positions, the extended mask's shape arithmetic) folds to constants, so a
//! range that does not start at 0 never sees token ids. The computation is the same
//! operations on the same values: a chain of ranges returns exactly (bit for bit) the whole
//! model's output, which `crates/osprey-engine/tests/split.rs` checks.
//!
//! Batch size is 1 per run: the cut needs concrete shapes. A request of several sentences
//! runs them one after another through the chain.

use osprey_core::error::{Error, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::model::SpecialOps;

/// Names of the token inputs of a BERT-style graph, in the order a first range takes them.
pub const TOKEN_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

/// What one range receives.
pub enum RangeInput<'a> {
    /// Unit 0's input: token ids and their attention mask (token types are zero).
    Tokens { ids: &'a [i64], mask: &'a [i64] },
    /// Any later unit's input: the hidden state `[1, seq, hidden]` and the mask.
    Hidden { hidden: &'a [f32], mask: &'a [i64] },
}

/// The parsed graph, before any cut.
pub struct SplitGraph {
    path: PathBuf,
    model: InferenceModel,
    boundaries: Vec<String>,
    seq_len: usize,
    hidden: usize,
}

impl SplitGraph {
    /// Parses the graph at `path`; `boundaries[i]` is the node that ends unit `i`.
    pub fn open(path: &Path, boundaries: &[String], seq_len: usize, hidden: usize) -> Result<SplitGraph> {
        let fail = |e: TractError| Error::invalid(format!("{}: {e:#}", path.display()));
        if boundaries.is_empty() {
            return Err(Error::invalid(format!("{}: no layer boundaries declared", path.display())));
        }
        // Intermediate shapes the exporter recorded name the symbolic sequence length; the cut
        // runs at a concrete one, so they are left out and inferred again.
        let mut model = tract_onnx::onnx().with_ignore_value_info(true).model_for_path(path).map_err(fail)?;
        for o in model.output_outlets().map_err(fail)?.to_vec() {
            model.set_outlet_fact(o, InferenceFact::default()).map_err(fail)?;
        }
        for b in boundaries {
            model.node_by_name(b).map_err(|_| {
                Error::invalid(format!("{}: layer boundary '{b}' is not a node of the graph", path.display()))
            })?;
        }
        for name in TOKEN_INPUTS {
            model.node_by_name(name).map_err(|_| {
                Error::invalid(format!("{}: the graph has no input '{name}'", path.display()))
            })?;
        }
        Ok(SplitGraph { path: path.to_path_buf(), model, boundaries: boundaries.to_vec(), seq_len, hidden })
    }

    /// Number of units (embedding + layers).
    pub fn units(&self) -> usize {
        self.boundaries.len()
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Builds and optimises the plan of units `range`.
    pub fn range(&self, range: Range<usize>) -> Result<RangePlan> {
        if range.start >= range.end || range.end > self.units() {
            return Err(Error::invalid(format!(
                "layer range {}..{} is not inside 0..{}",
                range.start,
                range.end,
                self.units()
            )));
        }
        let fail = |e: TractError| Error::invalid(format!("{} [{range:?}]: {e:#}", self.path.display()));
        let s = self.seq_len;
        let mut model = self.model.clone();
        for name in TOKEN_INPUTS {
            let id = model.node_by_name(name).map_err(fail)?.id;
            model
                .set_outlet_fact(
                    OutletId::new(id, 0),
                    InferenceFact::dt_shape(i64::datum_type(), tvec![1, s]),
                )
                .map_err(fail)?;
        }
        let end = &self.boundaries[range.end - 1];
        let mut model = model.with_outputs_by_name([end.as_str()]).map_err(fail)?;
        if range.start > 0 {
            let start = &self.boundaries[range.start - 1];
            // The boundary node becomes a source (compaction would do it, but only after
            // ordering the graph through the node's former inputs).
            let id = model.node_by_name(start).map_err(fail)?.id;
            let source = model.create_source(InferenceFact::default());
            let node = model.node_mut(id);
            node.inputs.clear();
            node.op = source;
            model.set_input_names([start.as_str(), "attention_mask"]).map_err(fail)?;
            model = model.into_compact().map_err(fail)?;
            model
                .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), tvec![1, s, self.hidden]))
                .map_err(fail)?;
            model.set_input_fact(1, InferenceFact::dt_shape(i64::datum_type(), tvec![1, s])).map_err(fail)?;
        } else {
            model.set_input_names(TOKEN_INPUTS).map_err(fail)?;
        }
        let plan = model.into_optimized().map_err(fail)?.into_runnable().map_err(fail)?;
        Ok(RangePlan { plan, range, seq_len: s, hidden: self.hidden, states: Mutex::default() })
    }
}

/// The runnable plan of one range of units.
pub struct RangePlan {
    plan: Arc<TypedRunnableModel>,
    range: Range<usize>,
    seq_len: usize,
    hidden: usize,
    states: Mutex<Vec<TypedSimpleState>>,
}

impl RangePlan {
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Positions per run (the fixed sequence length) and the hidden width.
    pub fn dims(&self) -> (usize, usize) {
        (self.seq_len, self.hidden)
    }

    /// Elements of the hidden state a boundary carries (`seq * hidden`).
    pub fn hidden_len(&self) -> usize {
        self.seq_len * self.hidden
    }

    /// Runs the range; returns the hidden state at its end, `[1, seq, hidden]` row-major.
    /// Inputs of the wrong kind or length are refused before anything is allocated.
    pub fn run(&self, input: RangeInput<'_>) -> Result<Vec<f32>> {
        let s = self.seq_len;
        let tensor_err = |e: TractError| Error::internal(format!("building range input: {e}"));
        let values: TVec<TValue> = match input {
            RangeInput::Tokens { ids, mask } => {
                if self.range.start != 0 {
                    return Err(Error::invalid(format!(
                        "units {:?} take a hidden state, not token ids",
                        self.range
                    )));
                }
                if ids.len() != s || mask.len() != s {
                    return Err(Error::invalid(format!("token inputs must have {s} positions")));
                }
                let ids = Tensor::from_shape(&[1, s], ids).map_err(tensor_err)?;
                let m = Tensor::from_shape(&[1, s], mask).map_err(tensor_err)?;
                let types = Tensor::zero::<i64>(&[1, s]).map_err(tensor_err)?;
                tvec![ids.into_tvalue(), m.into_tvalue(), types.into_tvalue()]
            }
            RangeInput::Hidden { hidden, mask } => {
                if self.range.start == 0 {
                    return Err(Error::invalid("units starting at the embedding take token ids"));
                }
                if hidden.len() != self.hidden_len() || mask.len() != s {
                    return Err(Error::invalid(format!(
                        "a hidden state must be [1, {s}, {}] with a mask of {s}",
                        self.hidden
                    )));
                }
                let h = Tensor::from_shape(&[1, s, self.hidden], hidden).map_err(tensor_err)?;
                let m = Tensor::from_shape(&[1, s], mask).map_err(tensor_err)?;
                tvec![h.into_tvalue(), m.into_tvalue()]
            }
        };
        let fail = |e: TractError| Error::internal(format!("layer range {:?} failed: {e:#}", self.range));
        let out = crate::session::run_pooled(&self.plan, &self.states, values).map_err(fail)?;
        let v = out.first().ok_or_else(|| Error::internal("layer range returned nothing"))?;
        if v.datum_type() != f32::datum_type() {
            return Err(Error::internal(format!(
                "layer range {:?} returned {:?}",
                self.range,
                v.datum_type()
            )));
        }
        let view: Vec<f32> =
            v.as_bytes().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if view.len() != self.hidden_len() {
            return Err(Error::internal(format!(
                "layer range {:?} returned {} values, expected {}",
                self.range,
                view.len(),
                self.hidden_len()
            )));
        }
        Ok(view)
    }
}

/// Sentence embedding from the last hidden state: the mean over the positions the mask keeps,
/// then L2-normalised (all-MiniLM-L6-v2's pooling and normalisation modules).
pub fn pool(hidden: &[f32], mask: &[i64], width: usize) -> Vec<f32> {
    let mut sum = vec![0f32; width];
    let mut kept = 0f32;
    for (row, &m) in hidden.chunks_exact(width).zip(mask) {
        if m != 0 {
            kept += 1.0;
            for (s, &h) in sum.iter_mut().zip(row) {
                *s += h;
            }
        }
    }
    let kept = kept.max(1.0);
    sum.iter_mut().for_each(|s| *s /= kept);
    let norm = sum.iter().map(|s| s * s).sum::<f32>().sqrt().max(1e-12);
    sum.iter_mut().for_each(|s| *s /= norm);
    sum
}
