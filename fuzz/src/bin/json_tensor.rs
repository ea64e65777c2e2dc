//! `RawTensor::from_json` on arbitrary datatypes, shapes and text; a decoded tensor must
//! encode again (`write_json_data`) without panicking.
use osprey_core::tensor::{DataType, RawTensor};

const TYPES: [DataType; 11] = [
    DataType::Bool,
    DataType::Uint8,
    DataType::Uint16,
    DataType::Uint32,
    DataType::Uint64,
    DataType::Int8,
    DataType::Int16,
    DataType::Int32,
    DataType::Int64,
    DataType::Fp32,
    DataType::Fp64,
];

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if data.len() < 2 {
            return;
        }
        let dt = TYPES[usize::from(data[0]) % TYPES.len()];
        let rank = usize::from(data[1] % 5).min(data.len() - 2);
        let shape: Vec<i64> = data[2..2 + rank].iter().map(|&d| i64::from(d as i8)).collect();
        let Ok(text) = std::str::from_utf8(&data[2 + rank..]) else { return };
        if let Ok(t) = RawTensor::from_json(dt, shape, text, "x") {
            let mut out = Vec::new();
            t.write_json_data(&mut out);
        }
    });
}
