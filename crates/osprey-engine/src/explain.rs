//! Occlusion explanations: which parts of an input the answer rests on, computed by running
//! the model on copies of the input with one patch masked at a time.
//!
//! Occlusion sensitivity (Zeiler and Fergus, "Visualizing and Understanding Convolutional
//! Networks", ECCV 2014), per sample x, answered class ŷ and patch k of the `[explain]` grid:
//! ```text
//! x₍ₖ₎  = x with every element of patch k set to the baseline
//! aₖ    = p(ŷ | x) − p(ŷ | x₍ₖ₎)
//! ```
//! A large aₖ: masking patch k takes probability away from the answer (the answer rests on
//! it); aₖ ≈ 0: the patch does not matter; aₖ < 0: the patch speaks against the answer. The
//! grid cuts the sample's dimensions evenly (dimension d in g cells: element i is in cell
//! ⌊i·g/d⌋); patches are numbered row-major over the grid. Only the model's first input is
//! masked; other inputs are repeated with each copy.
//!
//! The masked copies of one request run as one batch of `rows × patches` samples on the same
//! variant (the live system sends them through its queue like any request, so their time is
//! the dispatcher's to plan); [`explain`] runs them directly on a session (profiling, tests).

use crate::Session;
use osprey_core::error::{Error, Result};
use osprey_core::model::ExplainSpec;
use osprey_core::tensor::{DataType, RawTensor};

/// The baseline in `dt`'s little-endian encoding.
fn encode(dt: DataType, v: f64) -> Result<Vec<u8>> {
    Ok(match dt {
        DataType::Fp32 => (v as f32).to_le_bytes().to_vec(),
        DataType::Fp64 => v.to_le_bytes().to_vec(),
        DataType::Int8 => (v as i8).to_le_bytes().to_vec(),
        DataType::Int16 => (v as i16).to_le_bytes().to_vec(),
        DataType::Int32 => (v as i32).to_le_bytes().to_vec(),
        DataType::Int64 => (v as i64).to_le_bytes().to_vec(),
        DataType::Uint8 => (v as u8).to_le_bytes().to_vec(),
        DataType::Uint16 => (v as u16).to_le_bytes().to_vec(),
        DataType::Uint32 => (v as u32).to_le_bytes().to_vec(),
        DataType::Uint64 => (v as u64).to_le_bytes().to_vec(),
        other => return Err(Error::invalid(format!("occlusion cannot mask {other} inputs"))),
    })
}

/// For every element of one sample of `shape` (per-sample dims), its patch under `grid`.
pub fn patch_of_elements(shape: &[i64], grid: &[i64]) -> Vec<usize> {
    let n: usize = shape.iter().product::<i64>().max(0) as usize;
    (0..n)
        .map(|mut flat| {
            let mut index = vec![0i64; shape.len()];
            for d in (0..shape.len()).rev() {
                index[d] = flat as i64 % shape[d];
                flat /= shape[d] as usize;
            }
            let mut patch = 0usize;
            for d in 0..shape.len() {
                let cell = index[d] * grid[d] / shape[d];
                patch = patch * grid[d] as usize + cell as usize;
            }
            patch
        })
        .collect()
}

/// The masked copies of every sample of `inputs` (the model's inputs, first one masked):
/// sample n's copy k is row `n · patches + k`.
pub fn occlude(inputs: &[RawTensor], x: &ExplainSpec) -> Result<Vec<RawTensor>> {
    let first = inputs.first().ok_or_else(|| Error::invalid("a model without inputs cannot be explained"))?;
    let rows = *first.shape.first().ok_or_else(|| Error::invalid("an input without a batch dimension"))?;
    let sample = &first.shape[1..];
    if x.grid.len() != sample.len() || rows < 1 {
        return Err(Error::invalid(format!(
            "[explain] grid {:?} does not fit input shape {:?}",
            x.grid, first.shape
        )));
    }
    let patches = x.patches();
    let owner = patch_of_elements(sample, &x.grid);
    let size = first.datatype.size();
    let per = owner.len() * size;
    let base = encode(first.datatype, x.baseline)?;
    let mut out = Vec::with_capacity(first.data.len() * patches);
    for n in 0..rows as usize {
        let row = &first.data[n * per..(n + 1) * per];
        for k in 0..patches {
            let mut copy = row.to_vec();
            for (e, &p) in owner.iter().enumerate() {
                if p == k {
                    copy[e * size..(e + 1) * size].copy_from_slice(&base);
                }
            }
            out.extend_from_slice(&copy);
        }
    }
    let mut shape = first.shape.clone();
    shape[0] = rows * patches as i64;
    let mut all = vec![RawTensor::from_bytes(first.datatype, shape, out)?];
    for t in &inputs[1..] {
        let per = t.data.len() / rows as usize;
        let data: Vec<u8> = (0..rows as usize)
            .flat_map(|n| std::iter::repeat_n(&t.data[n * per..(n + 1) * per], patches).flatten().copied())
            .collect();
        let mut shape = t.shape.clone();
        shape[0] = rows * patches as i64;
        all.push(RawTensor::from_bytes(t.datatype, shape, data)?);
    }
    Ok(all)
}

/// aₖ of the module docs for every sample: `base` is rows × classes (the answer being
/// explained), `masked` (rows · patches) × classes (the model on the masked copies),
/// `targets` the class explained per row. Returns rows × patches.
pub fn attribution(
    base: &[f32],
    masked: &[f32],
    classes: usize,
    patches: usize,
    targets: &[usize],
) -> Result<Vec<f32>> {
    let rows = targets.len();
    if classes == 0 || base.len() != rows * classes || masked.len() != rows * patches * classes {
        return Err(Error::internal(format!(
            "attribution: {} answer values and {} masked values for {rows} rows of {classes} classes and {patches} patches",
            base.len(),
            masked.len()
        )));
    }
    let mut out = Vec::with_capacity(rows * patches);
    for (n, &y) in targets.iter().enumerate() {
        let y = y.min(classes - 1);
        let p = base[n * classes + y];
        for k in 0..patches {
            out.push(p - masked[(n * patches + k) * classes + y]);
        }
    }
    Ok(out)
}

/// Explains `inputs` on `session` directly: the answer (output `output`, rows × classes) and
/// the attribution of its argmax class (rows × patches).
pub fn explain(
    session: &Session,
    inputs: &[RawTensor],
    x: &ExplainSpec,
    output: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let answer = session.run(inputs)?;
    let base =
        answer.get(output).ok_or_else(|| Error::internal("the model gave no such output"))?.to_f32()?;
    let rows = inputs[0].shape[0].max(1) as usize;
    let classes = base.len() / rows;
    let masked = session.run(&occlude(inputs, x)?)?;
    let masked =
        masked.get(output).ok_or_else(|| Error::internal("the model gave no such output"))?.to_f32()?;
    let targets: Vec<usize> = base.chunks(classes.max(1)).map(argmax).collect();
    let a = attribution(&base, &masked, classes, x.patches(), &targets)?;
    Ok((base, a))
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &p) in row.iter().enumerate() {
        if p > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_cuts_the_sample_evenly_in_row_major_patches() {
        // 4x4 in a 2x2 grid: 2x2 blocks.
        let p = patch_of_elements(&[4, 4], &[2, 2]);
        assert_eq!(p, vec![0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]);
        // 10 samples in 3 cells: 4, 3, 3 (floor(i*3/10)).
        assert_eq!(patch_of_elements(&[10], &[3]), vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 2]);
    }

    #[test]
    fn each_copy_masks_exactly_its_patch_and_other_inputs_repeat() {
        let x = ExplainSpec { grid: vec![2], baseline: -1.0 };
        let image = RawTensor::from_f32(vec![2, 4], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).unwrap();
        let side = RawTensor::from_f32(vec![2, 1], &[10.0, 20.0]).unwrap();
        let out = occlude(&[image, side], &x).unwrap();
        assert_eq!(out[0].shape, vec![4, 4]);
        assert_eq!(
            out[0].to_f32().unwrap(),
            vec![-1.0, -1.0, 3.0, 4.0, 1.0, 2.0, -1.0, -1.0, -1.0, -1.0, 7.0, 8.0, 5.0, 6.0, -1.0, -1.0]
        );
        assert_eq!(out[1].to_f32().unwrap(), vec![10.0, 10.0, 20.0, 20.0]);
        let pcm = RawTensor::from_bytes(DataType::Int16, vec![1, 2], vec![7, 0, 9, 0]).unwrap();
        let out = occlude(&[pcm], &ExplainSpec { grid: vec![2], baseline: 0.0 }).unwrap();
        assert_eq!(out[0].data, vec![0, 0, 9, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn attribution_is_the_probability_the_mask_takes_away() {
        // One row, two classes, two patches: masking patch 0 drops class 1 from 0.9 to 0.2.
        let a = attribution(&[0.1, 0.9], &[0.8, 0.2, 0.05, 0.95], 2, 2, &[1]).unwrap();
        assert!((a[0] - 0.7).abs() < 1e-6 && (a[1] + 0.05).abs() < 1e-6, "{a:?}");
        assert!(attribution(&[0.1, 0.9], &[0.8], 2, 2, &[1]).is_err());
    }
}
