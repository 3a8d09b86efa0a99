//! Device selection from the strings users write in configs and on the command line.
//!
//! Accepted: `cpu`, `cuda` (GPU 0) and `cuda:N`. CUDA support is a compile-time feature;
//! a binary built without it says so instead of failing later with a backend error.

use anyhow::{Context, bail};
use candle_core::{Device, DeviceLocation};

/// Parses `cpu`, `cuda` or `cuda:N` (case-insensitive, surrounding spaces ignored).
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    let normalized = spec.trim().to_ascii_lowercase();
    let ordinal = match normalized.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().with_context(|| {
                format!("device {spec:?}: {n:?} is not a GPU index (expected cuda:N, e.g. cuda:0)")
            })?,
            None => bail!("unknown device {spec:?}: expected \"cpu\", \"cuda\" or \"cuda:N\""),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "device {spec:?} needs CUDA, but this binary was built without `--features cuda`; \
             rebuild with `cargo build --release --features cuda` or use \"cpu\""
        );
    }
    Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

/// The canonical spelling of `device` (`cpu`, `cuda:N`, `metal:N`), which
/// [`parse_device`] reads back for CPU and CUDA devices.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_round_trips() {
        for spec in ["cpu", " CPU ", "Cpu"] {
            let device = parse_device(spec).unwrap();
            assert!(device.is_cpu());
            assert_eq!(device_label(&device), "cpu");
        }
    }

    #[test]
    fn malformed_specs_are_rejected_with_the_input_named() {
        let err = parse_device("gpu").unwrap_err().to_string();
        assert!(err.contains("\"gpu\"") && err.contains("cuda:N"), "{err}");
        let err = format!("{:#}", parse_device("cuda:x").unwrap_err());
        assert!(err.contains("\"x\" is not a GPU index"), "{err}");
        assert!(parse_device("cuda:-1").is_err());
        assert!(parse_device("").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_explains_how_to_enable_it() {
        for spec in ["cuda", "cuda:1"] {
            let err = parse_device(spec).unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_device_round_trips_when_present() {
        if !candle_core::utils::cuda_is_available() {
            return;
        }
        let device = parse_device("cuda:0").unwrap();
        assert_eq!(device_label(&device), "cuda:0");
        assert_eq!(device_label(&parse_device("cuda").unwrap()), "cuda:0");
    }
}
