//! `--device auto|cpu|cuda[:N]|metal`.

use candle_core::Device;

use crate::error::{Error, Result};

/// Parse a device spec. `auto` picks CUDA when this build has it and a GPU answers, then
/// Metal, then the CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    let err = |msg: String| Error::Device {
        spec: spec.to_string(),
        msg,
    };
    match spec {
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        "cpu" => Ok(Device::Cpu),
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(err(
                    "this candor was built without Metal (build with --features metal)".into(),
                ));
            }
            Device::new_metal(0).map_err(|e| err(e.to_string()))
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| err(format!("`{n}` is not a GPU number")))?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(err(
                    "this candor was built without CUDA (build with --features cuda)".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| err(format!("cannot open GPU {ordinal}: {e}")))
        }
        _ => Err(err("expected auto, cpu, cuda, cuda:N or metal".into())),
    }
}

/// A device as `--device` names it: `cpu`, `cuda:N`, `metal:N`.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_auto_and_rejects_junk() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("auto").is_ok());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(
            e.contains("device `tpu`") && e.contains("expected auto"),
            "{e}"
        );
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:1").unwrap_err().to_string();
            assert!(e.contains("without CUDA"), "{e}");
        }
        assert!(parse_device("cuda:x").is_err());
    }
}
