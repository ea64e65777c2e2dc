//! Importing node heterogeneity from ROHE's device profiles (`performance_data_sample.yaml`:
//! per model, per Jetson-class device, per CPU/GPU: response time and throughput).
//!
//! A scenario node can say "this node is a Jetson Nano's CPU, relative to an Orin's CPU, as
//! measured on X3D_M": its speed becomes throughput(device) / throughput(reference), which then
//! scales the locally measured profile. Only the file's simple shape is read (nested mappings
//! by two-space indentation, `key: value` leaves), so no YAML library is needed.

use std::collections::BTreeMap;

/// `model -> device -> unit -> throughput` from the profile text.
pub fn throughputs(text: &str) -> Result<BTreeMap<(String, String, String), f64>, String> {
    let mut out = BTreeMap::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() || raw.trim_start().starts_with('#') {
            continue;
        }
        let indent = raw.len() - raw.trim_start().len();
        let line = raw.trim();
        let (key, value) =
            line.split_once(':').ok_or_else(|| format!("line {}: expected 'key: value'", n + 1))?;
        while path.last().is_some_and(|(i, _)| *i >= indent) {
            path.pop();
        }
        let value = value.trim();
        if value.is_empty() {
            path.push((indent, key.trim().to_string()));
            continue;
        }
        if key.trim() == "throughput" {
            // model / data / device / unit / throughput
            let keys: Vec<&str> = path.iter().map(|(_, k)| k.as_str()).collect();
            if let [model, "data", device, unit] = keys.as_slice() {
                let v: f64 = value
                    .parse()
                    .map_err(|_| format!("line {}: throughput '{value}' is not a number", n + 1))?;
                out.insert((model.to_string(), device.to_string(), unit.to_string()), v);
            }
        }
    }
    Ok(out)
}

/// Speed of `device` relative to `reference` for `model` on `unit` (CPU or GPU).
pub fn relative_speed(
    text: &str,
    model: &str,
    device: &str,
    reference: &str,
    unit: &str,
) -> Result<f64, String> {
    let t = throughputs(text)?;
    let get = |d: &str| {
        t.get(&(model.to_string(), d.to_string(), unit.to_string()))
            .copied()
            .ok_or_else(|| format!("no throughput for {model} / {d} / {unit} in the ROHE profile"))
    };
    let (a, b) = (get(device)?, get(reference)?);
    if b <= 0.0 {
        return Err(format!("reference throughput of {reference} is not positive"));
    }
    Ok(a / b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bundled_rohe_profile() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/rohe/performance_data_sample.yaml");
        let text = std::fs::read_to_string(p).unwrap();
        let t = throughputs(&text).unwrap();
        assert_eq!(t[&("MINIROCKET".into(), "jetson_nano".into(), "GPU".into())], 100.0);
        assert_eq!(t[&("MINIROCKET".into(), "jetson_nano".into(), "CPU".into())], 66.6);
        assert!(t.len() >= 20, "{}", t.len());
        let s = relative_speed(&text, "MINIROCKET", "jetson_nano", "jetson_xavier_agx", "CPU").unwrap();
        assert!((s - 0.666).abs() < 1e-9);
        assert!(relative_speed(&text, "NOPE", "jetson_nano", "jetson_xavier_agx", "CPU").is_err());
    }
}
