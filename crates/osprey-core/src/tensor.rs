//! Open Inference Protocol datatypes and raw tensors.
//!
//! A [`RawTensor`] holds its elements as little-endian bytes in row-major order, which is what
//! Triton's binary extension, gRPC `raw_*_contents` and the engine all use, so the hot path
//! never converts element by element. JSON is converted at the edge ([`RawTensor::from_json`],
//! [`RawTensor::write_json_data`]), with every element checked against its datatype's range.
//!
//! `BYTES` elements have no fixed size: their raw form is Triton's serialisation (each element
//! a 4-byte little-endian length, then that many bytes), which is what the binary extension
//! and `raw_input_contents` carry; [`RawTensor::from_bytes`] checks that layout against the
//! shape. `FP16` is IEEE half precision (the `half` crate), two bytes per element.

use crate::error::{Error, Result};

/// Tensor element types of the Open Inference Protocol that Osprey can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// Parses the protocol's spelling (`"FP32"`). BF16 is named in the error.
    pub fn parse(s: &str) -> Result<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == s).ok_or_else(|| match s {
            "BF16" => Error::invalid(format!("datatype {s} is not supported by Osprey's engine")),
            _ => Error::invalid(format!(
                "unknown datatype '{s}'; expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES"
            )),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Signed or unsigned integer types (not BOOL, not floating point, not BYTES).
    pub fn is_integer(self) -> bool {
        !matches!(self, DataType::Bool | DataType::Fp16 | DataType::Fp32 | DataType::Fp64 | DataType::Bytes)
    }

    /// Elements of variable size (`BYTES`).
    pub fn is_variable(self) -> bool {
        self == DataType::Bytes
    }

    /// Bytes per element; for `BYTES` (variable) the smallest element, its 4-byte length.
    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 | DataType::Bytes => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
        }
    }

    /// Triton model-configuration enum value (`TYPE_FP32` = 11, ...).
    pub fn triton_type(self) -> i32 {
        match self {
            DataType::Bool => 1,
            DataType::Uint8 => 2,
            DataType::Uint16 => 3,
            DataType::Uint32 => 4,
            DataType::Uint64 => 5,
            DataType::Int8 => 6,
            DataType::Int16 => 7,
            DataType::Int32 => 8,
            DataType::Int64 => 9,
            DataType::Fp16 => 10,
            DataType::Fp32 => 11,
            DataType::Fp64 => 12,
            DataType::Bytes => 13,
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number of elements of `shape`, or an error if it is negative or overflows.
pub fn element_count(shape: &[i64]) -> Result<usize> {
    let mut n: usize = 1;
    for &d in shape {
        let d = usize::try_from(d)
            .map_err(|_| Error::invalid(format!("shape {shape:?} has a negative dimension")))?;
        n = n.checked_mul(d).ok_or_else(|| Error::too_large(format!("shape {shape:?} overflows")))?;
    }
    Ok(n)
}

/// Byte size of a tensor, checked for overflow before anything is allocated. `BYTES` has no
/// size fixed by its shape: the smallest it can be (every element empty) is returned, and
/// [`RawTensor::from_bytes`] checks the actual layout.
pub fn byte_size(datatype: DataType, shape: &[i64]) -> Result<usize> {
    element_count(shape)?
        .checked_mul(datatype.size())
        .ok_or_else(|| Error::too_large(format!("shape {shape:?} of {datatype} overflows")))
}

/// A dense tensor: datatype, shape, little-endian row-major bytes. `data.len()` always equals
/// `byte_size(datatype, shape)` for tensors of fixed-size elements built through this
/// module's constructors; `BYTES` data is always a well-formed serialisation of exactly the
/// shape's element count.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Wraps raw bytes after checking that their length matches the shape.
    pub fn from_bytes(datatype: DataType, shape: Vec<i64>, data: Vec<u8>) -> Result<RawTensor> {
        if datatype.is_variable() {
            let want = element_count(&shape)?;
            let got = serialized_elements(&data).ok_or_else(|| {
                Error::invalid("BYTES data is not a sequence of 4-byte lengths each followed by its bytes")
            })?;
            if got != want {
                return Err(Error::invalid(format!(
                    "BYTES tensor of shape {shape:?} needs {want} elements, the data holds {got}"
                )));
            }
            return Ok(RawTensor { datatype, shape, data });
        }
        let want = byte_size(datatype, &shape)?;
        if want != data.len() {
            return Err(Error::invalid(format!(
                "{datatype} tensor of shape {shape:?} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(RawTensor { datatype, shape, data })
    }

    pub fn from_f32(shape: Vec<i64>, values: &[f32]) -> Result<RawTensor> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        RawTensor::from_bytes(DataType::Fp32, shape, data)
    }

    pub fn elements(&self) -> usize {
        if self.datatype.is_variable() {
            return element_count(&self.shape).unwrap_or(0);
        }
        self.data.len() / self.datatype.size()
    }

    /// A `BYTES` tensor of these elements.
    pub fn from_strings<S: AsRef<[u8]>>(shape: Vec<i64>, items: &[S]) -> Result<RawTensor> {
        let mut data = Vec::with_capacity(items.iter().map(|s| s.as_ref().len() + 4).sum());
        for it in items {
            let b = it.as_ref();
            let n = u32::try_from(b.len()).map_err(|_| Error::too_large("a BYTES element over 4 GiB"))?;
            data.extend_from_slice(&n.to_le_bytes());
            data.extend_from_slice(b);
        }
        RawTensor::from_bytes(DataType::Bytes, shape, data)
    }

    /// The elements of a `BYTES` tensor, in order.
    pub fn byte_elements(&self) -> Result<Vec<&[u8]>> {
        if !self.datatype.is_variable() {
            return Err(Error::invalid(format!("expected BYTES, tensor is {}", self.datatype)));
        }
        let mut out = Vec::new();
        let mut rest = &self.data[..];
        while rest.len() >= 4 {
            let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(item) = rest.get(4..4 + n) else { break };
            out.push(item);
            rest = &rest[4 + n..];
        }
        Ok(out)
    }

    /// Reads FP32 elements (for tests and the load generator's checks).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        if self.datatype != DataType::Fp32 {
            return Err(Error::invalid(format!("expected FP32, tensor is {}", self.datatype)));
        }
        Ok(self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Decodes the protocol's JSON `data` (flat or nested arrays, row-major) straight from its
    /// text into raw bytes, without building a JSON tree: every element checked against the
    /// datatype's range, the element count against the shape.
    pub fn from_json(datatype: DataType, shape: Vec<i64>, text: &str, name: &str) -> Result<RawTensor> {
        let want = element_count(&shape)?;
        // Every element takes at least one character and a separator: a shape claiming more
        // than the text can hold is refused before its buffer is allocated.
        if want > text.len() / 2 + 1 {
            return Err(Error::invalid(format!(
                "input '{name}': shape {shape:?} needs {want} elements, more than 'data' can hold"
            )));
        }
        let mut out = Vec::with_capacity(byte_size(datatype, &shape)?);
        let mut e = Elements { dt: datatype, out: &mut out, count: 0, limit: want, name, error: None };
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = serde::de::DeserializeSeed::deserialize(Seed(&mut e), &mut de).and_then(|()| de.end());
        if let Some(err) = e.error.take() {
            return Err(err);
        }
        parsed.map_err(|err| Error::invalid(format!("input '{name}': 'data' is not valid: {err}")))?;
        if e.count != want {
            return Err(Error::invalid(format!(
                "input '{name}': shape {shape:?} needs {want} elements, 'data' has {}",
                e.count
            )));
        }
        Ok(RawTensor { datatype, shape, data: out })
    }

    /// Appends the elements as a JSON array (numbers, booleans for BOOL; non-finite floats as
    /// `null`), flattened row-major, without building a JSON tree. FP32 is written at f32
    /// precision (the shortest text that reads back as the same f32).
    pub fn write_json_data(&self, out: &mut Vec<u8>) {
        let b = &self.data;
        out.push(b'[');
        macro_rules! each {
            ($t:ty, $sz:expr) => {
                for (i, c) in b.chunks_exact($sz).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let x = <$t>::from_le_bytes(c.try_into().unwrap_or([0; $sz]));
                    let _ = serde_json::to_writer(&mut *out, &x);
                }
            };
        }
        match self.datatype {
            DataType::Bool => {
                for (i, &x) in b.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(if x != 0 { b"true" } else { b"false" });
                }
            }
            DataType::Uint8 => each!(u8, 1),
            DataType::Uint16 => each!(u16, 2),
            DataType::Uint32 => each!(u32, 4),
            DataType::Uint64 => each!(u64, 8),
            DataType::Int8 => each!(i8, 1),
            DataType::Int16 => each!(i16, 2),
            DataType::Int32 => each!(i32, 4),
            DataType::Int64 => each!(i64, 8),
            DataType::Fp32 => each!(f32, 4),
            DataType::Fp64 => each!(f64, 8),
            DataType::Fp16 => {
                for (i, c) in b.chunks_exact(2).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let x = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                    let _ = serde_json::to_writer(&mut *out, &x);
                }
            }
            DataType::Bytes => {
                // Elements are written as JSON strings (invalid UTF-8 replaced), as Triton does.
                for (i, item) in self.byte_elements().unwrap_or_default().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let _ = serde_json::to_writer(&mut *out, &String::from_utf8_lossy(item));
                }
            }
        }
        out.push(b']');
    }
}

/// Number of elements of a well-formed `BYTES` serialisation, `None` if malformed.
fn serialized_elements(mut data: &[u8]) -> Option<usize> {
    let mut n = 0;
    while !data.is_empty() {
        let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
        data = data.get(4usize.checked_add(len)?..)?;
        n += 1;
    }
    Some(n)
}

/// The JSON scalars `data` may hold.
#[derive(Clone, Copy)]
enum Scalar<'s> {
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(&'s str),
}

impl std::fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::I64(i) => write!(f, "{i}"),
            Scalar::U64(u) => write!(f, "{u}"),
            Scalar::F64(x) => write!(f, "{x}"),
            Scalar::Str(_) => write!(f, "a string"),
        }
    }
}

/// Streaming decoder state of [`RawTensor::from_json`]; the first error is kept here
/// (serde only carries text).
struct Elements<'a> {
    dt: DataType,
    out: &'a mut Vec<u8>,
    count: usize,
    limit: usize,
    name: &'a str,
    error: Option<Error>,
}

impl Elements<'_> {
    fn push<E: serde::de::Error>(&mut self, v: Scalar<'_>) -> std::result::Result<(), E> {
        self.count += 1;
        let fail = |me: &mut Self, e: Error| {
            me.error = Some(e);
            E::custom("invalid element")
        };
        if self.count > self.limit {
            let e = Error::invalid(format!(
                "input '{}': 'data' has more elements than its shape allows ({})",
                self.name, self.limit
            ));
            return Err(fail(self, e));
        }
        let (dt, name, k) = (self.dt, self.name, self.count - 1);
        let bad = || Error::invalid(format!("input '{name}': element {k} ({v}) is not a valid {dt}"));
        macro_rules! int {
            ($t:ty) => {{
                let x = match v {
                    Scalar::I64(i) => <$t>::try_from(i).ok(),
                    Scalar::U64(u) => <$t>::try_from(u).ok(),
                    _ => None,
                };
                match x {
                    Some(x) => self.out.extend_from_slice(&x.to_le_bytes()),
                    None => return Err(fail(self, bad())),
                }
            }};
        }
        let float = |v: Scalar<'_>| match v {
            Scalar::I64(i) => Some(i as f64),
            Scalar::U64(u) => Some(u as f64),
            Scalar::F64(x) => Some(x),
            Scalar::Bool(_) | Scalar::Str(_) => None,
        };
        match dt {
            DataType::Bool => match v {
                Scalar::Bool(b) => self.out.push(b as u8),
                _ => return Err(fail(self, bad())),
            },
            DataType::Uint8 => int!(u8),
            DataType::Uint16 => int!(u16),
            DataType::Uint32 => int!(u32),
            DataType::Uint64 => int!(u64),
            DataType::Int8 => int!(i8),
            DataType::Int16 => int!(i16),
            DataType::Int32 => int!(i32),
            DataType::Int64 => int!(i64),
            DataType::Fp32 => match float(v) {
                Some(x) => self.out.extend_from_slice(&(x as f32).to_le_bytes()),
                None => return Err(fail(self, bad())),
            },
            DataType::Fp64 => match float(v) {
                Some(x) => self.out.extend_from_slice(&x.to_le_bytes()),
                None => return Err(fail(self, bad())),
            },
            DataType::Fp16 => match float(v) {
                Some(x) => self.out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
                None => return Err(fail(self, bad())),
            },
            DataType::Bytes => match v {
                Scalar::Str(t) => {
                    let n = u32::try_from(t.len()).map_err(|_| fail(self, bad()))?;
                    self.out.extend_from_slice(&n.to_le_bytes());
                    self.out.extend_from_slice(t.as_bytes());
                }
                _ => return Err(fail(self, bad())),
            },
        }
        Ok(())
    }
}

/// Visits `data`: arrays are flattened, scalars appended.
struct Seed<'s, 'a>(&'s mut Elements<'a>);

impl<'de> serde::de::DeserializeSeed<'de> for Seed<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Seed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number, a boolean or an array of them")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while seq.next_element_seed(Seed(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<(), E> {
        self.0.push(Scalar::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<(), E> {
        self.0.push(Scalar::I64(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<(), E> {
        self.0.push(Scalar::U64(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<(), E> {
        self.0.push(Scalar::F64(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<(), E> {
        if self.0.dt == DataType::Bytes {
            return self.0.push(Scalar::Str(v));
        }
        let e = self.0;
        e.count += 1;
        let k = e.count - 1;
        e.error = Some(Error::invalid(format!(
            "input '{}': element {k} (\"{v}\") is not a valid {}",
            e.name, e.dt
        )));
        Err(E::custom("invalid element"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(t: &RawTensor) -> String {
        let mut out = Vec::new();
        t.write_json_data(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_shape_larger_than_its_text_is_refused_before_allocating() {
        // 127^4 FP64 elements would be a 2 GB buffer for a 9-byte text.
        let e = RawTensor::from_json(DataType::Fp64, vec![127, 127, 127, 127], "[1,2,3,4]", "x").unwrap_err();
        assert!(e.message.contains("more than 'data' can hold"), "{e}");
        assert!(RawTensor::from_json(DataType::Fp64, vec![1], "7", "x").is_ok());
        assert!(RawTensor::from_json(DataType::Fp64, vec![0], "[]", "x").is_ok());
    }

    #[test]
    fn json_round_trip_keeps_values() {
        let t = RawTensor::from_json(DataType::Int16, vec![2, 2], "[[1, -2], [300, -32768]]", "x").unwrap();
        assert_eq!(t.data.len(), 8);
        assert_eq!(written(&t), "[1,-2,300,-32768]");
        let f = RawTensor::from_json(DataType::Fp32, vec![3], "[0.5, 1, -2.25]", "x").unwrap();
        assert_eq!(f.to_f32().unwrap(), vec![0.5, 1.0, -2.25]);
        let b = RawTensor::from_json(DataType::Bool, vec![2], "[true, false]", "x").unwrap();
        assert_eq!(written(&b), "[true,false]");
        let u = RawTensor::from_json(DataType::Uint64, vec![1], "[18446744073709551615]", "x").unwrap();
        assert_eq!(written(&u), "[18446744073709551615]");
        let d = RawTensor::from_json(DataType::Fp64, vec![2, 1], "[[1e300], [-0.125]]", "x").unwrap();
        assert_eq!(written(&d), "[1e+300,-0.125]");
    }

    #[test]
    fn json_rejects_out_of_range_and_wrong_types() {
        let e = RawTensor::from_json(DataType::Int8, vec![1], "[200]", "x").unwrap_err();
        assert!(e.message.contains("not a valid INT8"), "{e}");
        let e = RawTensor::from_json(DataType::Fp32, vec![1], "[\"a\"]", "x").unwrap_err();
        assert!(e.message.contains("not a valid FP32"), "{e}");
        let e = RawTensor::from_json(DataType::Uint8, vec![1], "[-1]", "x").unwrap_err();
        assert!(e.message.contains("UINT8"), "{e}");
    }

    #[test]
    fn json_checks_element_count_both_ways() {
        let e = RawTensor::from_json(DataType::Fp32, vec![2, 2], "[1, 2, 3]", "x").unwrap_err();
        assert!(e.message.contains("needs 4 elements, 'data' has 3"), "{e}");
        let e = RawTensor::from_json(DataType::Fp32, vec![1], "[1, 2]", "x").unwrap_err();
        assert!(e.message.contains("more elements"), "{e}");
    }

    #[test]
    fn json_refuses_what_is_not_a_tensor() {
        for (dt, text, want) in [
            (DataType::Bool, "[1]", "element 0 (1) is not a valid BOOL"),
            (DataType::Fp32, "[1,", "'data' is not valid"),
            (DataType::Fp32, "[{}]", "'data' is not valid"),
            (DataType::Fp32, "[1] 2", "'data' is not valid"),
        ] {
            let e = RawTensor::from_json(dt, vec![1], text, "x").unwrap_err();
            assert!(e.message.contains(want), "{text}: {e}");
            assert!(e.message.contains("input 'x'"), "{text}: {e}");
        }
    }

    #[test]
    fn json_writing_reads_back_the_same_values() {
        let f = RawTensor::from_json(DataType::Fp32, vec![4], "[0.1, -2.5, 1e-7, 3]", "x").unwrap();
        let text = written(&f);
        assert_eq!(text, "[0.1,-2.5,1e-7,3.0]");
        assert_eq!(RawTensor::from_json(DataType::Fp32, vec![4], &text, "x").unwrap(), f);
        let nan = RawTensor::from_bytes(DataType::Fp32, vec![1], f32::NAN.to_le_bytes().to_vec()).unwrap();
        assert_eq!(written(&nan), "[null]");
    }

    #[test]
    fn bytes_tensors_round_trip_through_json_and_their_layout_is_checked() {
        let t = RawTensor::from_json(DataType::Bytes, vec![2], r#"["héllo", ""]"#, "text").unwrap();
        assert_eq!(t.byte_elements().unwrap(), vec!["héllo".as_bytes(), b""]);
        assert_eq!(t, RawTensor::from_strings(vec![2], &["héllo", ""]).unwrap());
        assert_eq!(written(&t), r#"["héllo",""]"#);
        assert_eq!(t.elements(), 2);
        // Wrong count, truncated element, trailing garbage, a number: refused.
        assert!(RawTensor::from_json(DataType::Bytes, vec![3], r#"["a","b"]"#, "t").is_err());
        assert!(RawTensor::from_json(DataType::Bytes, vec![1], "[1]", "t").is_err());
        assert!(RawTensor::from_bytes(DataType::Bytes, vec![1], vec![5, 0, 0, 0, b'a']).is_err());
        assert!(RawTensor::from_bytes(DataType::Bytes, vec![1], vec![1, 0, 0, 0, b'a', 0]).is_err());
        assert!(RawTensor::from_bytes(DataType::Bytes, vec![1], vec![255, 255, 255, 255]).is_err());
        assert!(RawTensor::from_bytes(DataType::Bytes, vec![0], vec![]).is_ok());
    }

    #[test]
    fn fp16_round_trips_through_json_at_half_precision() {
        let t = RawTensor::from_json(DataType::Fp16, vec![3], "[1.5, -2, 65504]", "x").unwrap();
        assert_eq!(t.data.len(), 6);
        assert_eq!(written(&t), "[1.5,-2.0,65504.0]");
        assert!(RawTensor::from_json(DataType::Fp16, vec![1], "[true]", "x").is_err());
    }

    #[test]
    fn byte_sizes_that_overflow_are_errors_not_panics() {
        let e = byte_size(DataType::Fp64, &[i64::MAX, i64::MAX]).unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::PayloadTooLarge);
        assert!(element_count(&[-1, 4]).is_err());
        let e = RawTensor::from_bytes(DataType::Fp32, vec![2], vec![0; 7]).unwrap_err();
        assert!(e.message.contains("needs 8 bytes, got 7"), "{e}");
    }

    #[test]
    fn datatype_parsing_names_unsupported_types() {
        assert_eq!(DataType::parse("FP32").unwrap(), DataType::Fp32);
        assert!(DataType::parse("BF16").unwrap_err().message.contains("not supported"));
        assert_eq!(DataType::parse("FP16").unwrap(), DataType::Fp16);
        assert_eq!(DataType::parse("BYTES").unwrap(), DataType::Bytes);
        assert!(DataType::parse("float").unwrap_err().message.contains("unknown datatype"));
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()).unwrap(), d);
        }
    }
}
