//! Protobuf decoding of `ModelInferRequest` and the tensor decoder behind it on arbitrary bytes.
use prost::Message;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(mut r) = osprey_server::pb::ModelInferRequest::decode(data) {
            let _ = osprey_server::grpc::decode_request(&mut r);
        }
    });
}
