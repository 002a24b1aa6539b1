//! The CUDA backend: the same filter step as [`crate::filter::Filter`], on an NVIDIA GPU.
//!
//! - `kernels/*.cu` are our own kernels, compiled once per process at run time with NVRTC
//!   ([`kernels`]) and launched through cudarc's driver API;
//! - [`GpuBatch`] steps B independent decoders (one model, or B models of one shape, each
//!   with its own state and seed) with ONE CUDA Graph launch per bin: the H2D copy of the
//!   bins from pinned memory, every kernel, and the D2H copy of status, mean, lag-1 mean and
//!   behaviour into pinned memory. Weights are uploaded once, every buffer is allocated in
//!   `new`, nothing is compiled or allocated per bin;
//! - [`GpuFilter`] is a batch of one behind the [`crate::decoder::Decoder`] trait.
//!
//! The kernels evaluate the CPU's arithmetic in the CPU's order (sequential FMA chains, the
//! same eight-way dot products, the same Philox draws and fast tanh), compiled with
//! `--fmad=false`, so both backends agree to rounding (exp and log in the Poisson-Laplace
//! update and the KL are the only libm calls whose last bit may differ).
//!
//! Without CUDA nothing here panics: [`availability`] checks for libcuda and libnvrtc before
//! the first driver call (cudarc panics on a missing library) and then asks the driver for
//! a device inside a panic guard; [`select_backend`] turns the answer into a choice.

mod batch;
mod cuda_exec;
mod emu;
mod exec;
mod filter;
pub mod kernels;
mod plan;
mod runtime;
mod weights;

pub use batch::GpuBatch;
pub use exec::Profile;

/// Floats before the mean in each decoder's output row: [status, kl, 0, 0].
pub const OUT_HEADER: usize = 4;
pub use filter::GpuFilter;

use std::sync::OnceLock;

/// Where the XFADS filter runs. (Kalman decoders always run on the CPU.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    Cpu,
    Cuda,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        })
    }
}

/// The device the backend would use.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Number of CUDA devices; the backend uses device 0.
    pub devices: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// cuDriverGetVersion, e.g. 12080.
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
}

fn probe() -> Result<DeviceInfo, String> {
    use cudarc::driver::{result, sys};
    // SAFETY: only dlopen attempts.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda not found (no NVIDIA driver on this machine)".into());
    }
    let nvrtc_version = kernels::nvrtc_version().ok_or_else(|| {
        "libnvrtc not found (run scripts/install-nvrtc.sh and set LD_LIBRARY_PATH as it prints)".to_string()
    })?;
    let guarded = std::panic::catch_unwind(|| -> Result<DeviceInfo, String> {
        result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        let devices = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
        if devices < 1 {
            return Err("no CUDA device".into());
        }
        let dev = result::device::get(0).map_err(|e| format!("cuDeviceGet(0) failed: {e:?}"))?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
        use sys::CUdevice_attribute::*;
        // SAFETY: `dev` came from cuDeviceGet.
        let major = unsafe { result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) }
            .map_err(|e| format!("device attribute: {e:?}"))?;
        // SAFETY: as above.
        let minor = unsafe { result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) }
            .map_err(|e| format!("device attribute: {e:?}"))?;
        let mut driver_version = 0i32;
        // SAFETY: one out-parameter.
        let _ = unsafe { sys::cuDriverGetVersion(&mut driver_version) };
        Ok(DeviceInfo {
            devices: devices as usize,
            name,
            compute_capability: (major, minor),
            driver_version,
            nvrtc_version,
        })
    });
    guarded.unwrap_or_else(|_| Err("the CUDA driver library is missing an entry point (driver too old?)".into()))
}

/// Whether the CUDA backend can run here (checked once per process), and on what.
pub fn availability() -> Result<&'static DeviceInfo, String> {
    static INFO: OnceLock<Result<DeviceInfo, String>> = OnceLock::new();
    INFO.get_or_init(probe).as_ref().map_err(Clone::clone)
}

/// `"cpu" | "cuda" | "auto"` (the config's `[model] backend`, `eval --backend`) to a backend:
/// auto picks CUDA only when it is available; "cuda" where it is not is an error that says why.
pub fn select_backend(name: &str) -> Result<Backend, String> {
    match name {
        "cpu" => Ok(Backend::Cpu),
        "cuda" => availability()
            .map(|_| Backend::Cuda)
            .map_err(|why| format!("backend \"cuda\" was asked for but CUDA is not usable here: {why}")),
        "auto" => Ok(if availability().is_ok() { Backend::Cuda } else { Backend::Cpu }),
        other => Err(format!("unknown backend \"{other}\": expected cpu, cuda or auto")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_never_panics_and_explains() {
        assert_eq!(select_backend("cpu"), Ok(Backend::Cpu));
        assert!(select_backend("tpu").unwrap_err().contains("expected cpu, cuda or auto"));
        let auto = select_backend("auto").unwrap();
        match availability() {
            Ok(_) => {
                assert_eq!(auto, Backend::Cuda);
                assert_eq!(select_backend("cuda"), Ok(Backend::Cuda));
            }
            Err(why) => {
                assert_eq!(auto, Backend::Cpu);
                let e = select_backend("cuda").unwrap_err();
                assert!(e.contains(why.as_str()), "{e}");
            }
        }
    }
}
