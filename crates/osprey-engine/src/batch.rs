//! Batching: requests are concatenated along the first (batch) dimension before execution and
//! outputs are split back by each request's batch size.

use osprey_core::error::{Error, Result};
use osprey_core::tensor::RawTensor;

/// Concatenates tensors that agree on datatype and per-sample shape.
pub fn concat(parts: &[&RawTensor]) -> Result<RawTensor> {
    let first = parts.first().ok_or_else(|| Error::internal("empty batch"))?;
    let mut rows: i64 = 0;
    let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
    for p in parts {
        if p.datatype != first.datatype || p.shape[1..] != first.shape[1..] {
            return Err(Error::internal("batch members disagree on datatype or shape"));
        }
        rows += p.shape[0];
        data.extend_from_slice(&p.data);
    }
    let mut shape = first.shape.clone();
    shape[0] = rows;
    RawTensor::from_bytes(first.datatype, shape, data)
}

/// Splits `t` along its first dimension into pieces of `sizes` rows.
pub fn split(t: &RawTensor, sizes: &[i64]) -> Result<Vec<RawTensor>> {
    let total: i64 = sizes.iter().sum();
    if t.shape.first() != Some(&total) {
        return Err(Error::internal(format!(
            "model returned {:?} rows for a batch of {total}",
            t.shape.first()
        )));
    }
    let row_bytes = if total == 0 { 0 } else { t.data.len() / total as usize };
    let mut out = Vec::with_capacity(sizes.len());
    let mut off = 0usize;
    for &n in sizes {
        let len = n as usize * row_bytes;
        let mut shape = t.shape.clone();
        shape[0] = n;
        out.push(RawTensor::from_bytes(t.datatype, shape, t.data[off..off + len].to_vec())?);
        off += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_then_split_is_identity() {
        let a = RawTensor::from_f32(vec![1, 2], &[1.0, 2.0]).unwrap();
        let b = RawTensor::from_f32(vec![2, 2], &[3.0, 4.0, 5.0, 6.0]).unwrap();
        let c = concat(&[&a, &b]).unwrap();
        assert_eq!(c.shape, vec![3, 2]);
        let parts = split(&c, &[1, 2]).unwrap();
        assert_eq!(parts, vec![a, b]);
    }

    #[test]
    fn mismatched_members_are_refused() {
        let a = RawTensor::from_f32(vec![1, 2], &[1.0, 2.0]).unwrap();
        let b = RawTensor::from_f32(vec![1, 1], &[3.0]).unwrap();
        assert!(concat(&[&a, &b]).is_err());
        assert!(split(&a, &[2]).is_err());
    }
}
