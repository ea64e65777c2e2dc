//! The REST inference body decoder (JSON header + Triton binary tensors) on arbitrary bytes:
//! the first two bytes give the JSON header's length, the rest is the body.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if data.len() < 2 {
            return;
        }
        let body = &data[2..];
        let n = (usize::from(u16::from_le_bytes([data[0], data[1]]))).min(body.len());
        let _ = osprey_server::http::decode_request(
            &body[..n],
            bytes::Bytes::copy_from_slice(&body[n..]),
            1 << 20,
        );
    });
}
