//! The strict `model.toml` parser (with its path-containment checks) on arbitrary text.
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = osprey_core::model::ModelSpec::parse(
                "m",
                Path::new("/tmp/m"),
                text,
                Path::new("/tmp/m/model.toml"),
            );
        }
    });
}
