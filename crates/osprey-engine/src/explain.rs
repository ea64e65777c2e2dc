//! Occlusion explanations: which parts of an input the answer rests on, computed by running
//! the model on copies of the input with one patch masked at a time.
//!
//! Occlusion sensitivity (Zeiler and Fergus, "Visualizing and Understanding Convolutional
//! Networks", ECCV 2014), per sample x, answered class ŷ and patch k of the `[explain]` grid:
//! ```text
//! x₍ₖ₎  = x with every element of patch k set to the baseline (fill = "value"), or to the
//!        matching element of x's lowest-energy patch q = argmin_j mean_{e∈j} x_e² (fill =
//!        "quietest", its noise floor)
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
use osprey_core::model::{ExplainSpec, Fill};
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

/// Every element of `data` as a number (the datatypes [`encode`] can write).
fn decode(dt: DataType, data: &[u8]) -> Result<Vec<f64>> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            data.chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or([0; $n])) as f64)
                .collect()
        };
    }
    Ok(match dt {
        DataType::Fp32 => conv!(f32, 4),
        DataType::Fp64 => conv!(f64, 8),
        DataType::Int8 => conv!(i8, 1),
        DataType::Int16 => conv!(i16, 2),
        DataType::Int32 => conv!(i32, 4),
        DataType::Int64 => conv!(i64, 8),
        DataType::Uint8 => conv!(u8, 1),
        DataType::Uint16 => conv!(u16, 2),
        DataType::Uint32 => conv!(u32, 4),
        DataType::Uint64 => conv!(u64, 8),
        other => return Err(Error::invalid(format!("occlusion cannot read {other} inputs"))),
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
    // Each patch's elements, in row-major order.
    let mut members = vec![Vec::new(); patches];
    for (e, &p) in owner.iter().enumerate() {
        members[p].push(e);
    }
    let size = first.datatype.size();
    let per = owner.len() * size;
    let base = encode(first.datatype, x.baseline)?;
    let values = match x.fill {
        Fill::Value => None,
        Fill::Quietest => Some(decode(first.datatype, &first.data)?),
    };
    let mut out = Vec::with_capacity(first.data.len() * patches);
    for n in 0..rows as usize {
        let row = &first.data[n * per..(n + 1) * per];
        let quietest =
            values.as_ref().map(|v| quietest_patch(&v[n * owner.len()..(n + 1) * owner.len()], &members));
        for elements in &members {
            let mut copy = row.to_vec();
            for (j, &e) in elements.iter().enumerate() {
                let fill = match quietest {
                    None => &base[..],
                    Some(q) => {
                        let src = members[q][j % members[q].len()];
                        &row[src * size..(src + 1) * size]
                    }
                };
                copy[e * size..(e + 1) * size].copy_from_slice(fill);
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

/// The patch with the lowest mean squared value (the first of equals).
fn quietest_patch(sample: &[f64], members: &[Vec<usize>]) -> usize {
    let energy = |m: &Vec<usize>| m.iter().map(|&e| sample[e].powi(2)).sum::<f64>() / m.len().max(1) as f64;
    let mut best = 0;
    for k in 1..members.len() {
        if energy(&members[k]) < energy(&members[best]) {
            best = k;
        }
    }
    best
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
        let x = ExplainSpec { grid: vec![2], baseline: -1.0, fill: Fill::Value };
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
        let out = occlude(&[pcm], &ExplainSpec { grid: vec![2], baseline: 0.0, fill: Fill::Value }).unwrap();
        assert_eq!(out[0].data, vec![0, 0, 9, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn quietest_fill_copies_the_lowest_energy_patch_cyclically() {
        let x = ExplainSpec { grid: vec![3], baseline: 0.0, fill: Fill::Quietest };
        // Patches of 10 elements in 3 cells: [0..4), [4..7), [7..10); the middle one is quietest.
        let row = [5.0, -5.0, 6.0, 4.0, 1.0, -1.0, 0.5, 9.0, 8.0, -9.0];
        let out = occlude(&[RawTensor::from_f32(vec![1, 10], &row).unwrap()], &x).unwrap();
        let v = out[0].to_f32().unwrap();
        // Copy 0: patch 0 (4 elements) takes 1, -1, 0.5, then 1 again.
        assert_eq!(&v[..10], &[1.0, -1.0, 0.5, 1.0, 1.0, -1.0, 0.5, 9.0, 8.0, -9.0]);
        // Copy 1 masks the quietest patch with itself: the sample unchanged.
        assert_eq!(&v[10..20], &row);
        assert_eq!(&v[27..30], &[1.0, -1.0, 0.5]);
        // Integers too, rows apart: the second row's quietest patch is its first.
        let pcm = RawTensor::from_bytes(DataType::Int16, vec![2, 2], vec![9, 0, 1, 0, 2, 0, 30, 0]).unwrap();
        let out =
            occlude(&[pcm], &ExplainSpec { grid: vec![2], baseline: 0.0, fill: Fill::Quietest }).unwrap();
        assert_eq!(out[0].data, vec![1, 0, 1, 0, 9, 0, 1, 0, 2, 0, 30, 0, 2, 0, 2, 0]);
    }

    #[test]
    fn attribution_is_the_probability_the_mask_takes_away() {
        // One row, two classes, two patches: masking patch 0 drops class 1 from 0.9 to 0.2.
        let a = attribution(&[0.1, 0.9], &[0.8, 0.2, 0.05, 0.95], 2, 2, &[1]).unwrap();
        assert!((a[0] - 0.7).abs() < 1e-6 && (a[1] + 0.05).abs() < 1e-6, "{a:?}");
        assert!(attribution(&[0.1, 0.9], &[0.8], 2, 2, &[1]).is_err());
    }
}
