//! The process-wide CUDA context and the kernels, compiled once with NVRTC on first use.

use super::kernels;
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// The process-wide context and the loaded kernels (compiled once, on first use).
pub(super) struct Runtime {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) functions: HashMap<&'static str, CudaFunction>,
}

fn pick_arch(cc: (i32, i32)) -> String {
    let want = cc.0 * 10 + cc.1;
    // The newest architecture this NVRTC knows that is not newer than the device (PTX for
    // an older architecture is JIT-compiled by the driver for the newer one).
    let supported: Vec<i32> = std::panic::catch_unwind(|| {
        let mut n = 0i32;
        // SAFETY: out-parameters sized by the first call.
        unsafe {
            if cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n) != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
                return Vec::new();
            }
            let mut v = vec![0i32; n.max(0) as usize];
            if cudarc::nvrtc::sys::nvrtcGetSupportedArchs(v.as_mut_ptr())
                != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS
            {
                return Vec::new();
            }
            v
        }
    })
    .unwrap_or_default();
    let arch = supported.iter().copied().filter(|&a| a <= want).max().unwrap_or(want);
    format!("sm_{arch}")
}

fn init_runtime() -> Result<Runtime, String> {
    let info = super::availability()?;
    let ctx = std::panic::catch_unwind(|| CudaContext::new(0))
        .map_err(|_| "creating the CUDA context panicked".to_string())?
        .map_err(|e| format!("cannot create a CUDA context on device 0: {e:?}"))?;
    // Every buffer of a decoder is used on that decoder's stream only, and kernels get raw
    // device pointers, so cudarc's cross-stream event tracking is not needed (and events
    // recorded outside a capture must not be waited on inside one).
    // SAFETY: see above; no CudaSlice is shared between streams.
    unsafe { ctx.disable_event_tracking() };
    let arch = pick_arch(info.compute_capability);
    let compiled = kernels::compile(&kernels::program(), "latentloop_kernels.cu", &arch)?;
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(compiled.ptx)).map_err(|e| {
        format!(
            "the driver ({}) cannot load the PTX of NVRTC {}.{} for {arch}: {e:?}{}",
            info.driver_version,
            info.nvrtc_version.0,
            info.nvrtc_version.1,
            if e.0 == sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                "; the driver is older than this NVRTC: install an NVRTC wheel no newer than the driver's CUDA version"
            } else {
                ""
            }
        )
    })?;
    let mut functions = HashMap::new();
    for &name in kernels::KERNELS {
        let f = module.load_function(name).map_err(|e| format!("kernel {name} missing from the module: {e:?}"))?;
        functions.insert(name, f);
    }
    Ok(Runtime { ctx, functions })
}

pub(super) fn runtime() -> Result<&'static Runtime, String> {
    static RT: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RT.get_or_init(init_runtime).as_ref().map_err(Clone::clone)
}
