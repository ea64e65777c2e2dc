//! `RawTensor::from_json` on arbitrary datatypes, shapes and text; a decoded tensor must
//! encode again (`write_json_data`) without panicking.
use osprey_core::tensor::{DataType, RawTensor};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if data.len() < 2 {
            return;
        }
        let dt = DataType::ALL[usize::from(data[0]) % DataType::ALL.len()];
        let rank = usize::from(data[1] % 5).min(data.len() - 2);
        let shape: Vec<i64> = data[2..2 + rank].iter().map(|&d| i64::from(d as i8)).collect();
        let Ok(text) = std::str::from_utf8(&data[2 + rank..]) else { return };
        if let Ok(t) = RawTensor::from_json(dt, shape, text, "x") {
            let mut out = Vec::new();
            t.write_json_data(&mut out);
        }
    });
}
