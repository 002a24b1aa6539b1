//! The CUDA sources (kernels/*.cu, kernels/*.cuh, embedded in the binary) and their run-time
//! compilation with NVRTC.
//!
//! NVRTC has no file system view of `kernels/`, so `#include "x.cuh"` lines are resolved
//! here, textually, each header once per program. Options: the device's `sm_XY`, C++17,
//! IEEE division and square root, no flush-to-zero, and `--fmad=false` so that the only
//! fused multiply-adds are the `fmaf` calls written in the sources, the ones the CPU
//! backend makes with `f32::mul_add`.

use std::collections::HashSet;

/// Every source file, by the name `#include` uses.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("fastmath.cuh", include_str!("../../kernels/fastmath.cuh")),
    ("philox.cuh", include_str!("../../kernels/philox.cuh")),
    ("predict.cu", include_str!("../../kernels/predict.cu")),
    ("update.cu", include_str!("../../kernels/update.cu")),
];

/// The translation units (each compiles on its own; the run-time program is all of them).
pub const KERNEL_FILES: &[&str] = &["predict.cu", "update.cu"];

/// Every `extern "C" __global__` entry point the backend loads.
pub const KERNELS: &[&str] = &[
    "ll_noise",
    "ll_gemm_epi",
    "ll_rk4_stage",
    "ll_gru_cell",
    "ll_rmsnorm",
    "ll_moments",
    "ll_pred_draws",
    "ll_enc_hidden",
    "ll_enc_out",
    "ll_pot_gaussian",
    "ll_pot_pl_a",
    "ll_pot_pl_b",
    "ll_update_products",
    "ll_update_gram",
    "ll_update_core",
    "ll_update_draws",
];

fn lookup(name: &str) -> Result<&'static str, String> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).ok_or_else(|| format!("no kernel source named {name}"))
}

fn expand(name: &str, seen: &mut HashSet<String>, out: &mut String) -> Result<(), String> {
    let text = lookup(name)?;
    out.push_str(&format!("// ---- {name}\n"));
    for line in text.lines() {
        let t = line.trim();
        if t == "#pragma once" {
            continue;
        }
        if let Some(rest) = t.strip_prefix("#include") {
            let inc = rest.trim().trim_matches('"');
            if rest.trim().starts_with('"') {
                if seen.insert(inc.to_string()) {
                    expand(inc, seen, out)?;
                }
                continue;
            }
            return Err(format!("{name}: only #include \"file\" of kernels/ is supported: {t}"));
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(())
}

/// One translation unit with its includes inlined.
pub fn source(file: &str) -> Result<String, String> {
    let mut seen = HashSet::new();
    seen.insert(file.to_string());
    let mut out = String::new();
    expand(file, &mut seen, &mut out)?;
    Ok(out)
}

/// The whole run-time program: every kernel file, each header once.
pub fn program() -> String {
    let mut seen = HashSet::new();
    let mut out = String::new();
    for f in KERNEL_FILES {
        if seen.insert(f.to_string()) {
            expand(f, &mut seen, &mut out).expect("embedded kernel sources resolve");
        }
    }
    out
}

/// The NVRTC options for an architecture such as "sm_90".
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
        // Make NVRTC say why, with the warning's number, whenever it says anything.
        "--display-error-number".into(),
    ]
}

/// Whether libnvrtc can be loaded (checked before any NVRTC call, which would panic).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version (major, minor), if the library is present.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    std::panic::catch_unwind(|| {
        let (mut a, mut b) = (0i32, 0i32);
        // SAFETY: two out-parameters.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
        (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((a, b))
    })
    .ok()
    .flatten()
}

/// A compiled program: its PTX and NVRTC's log (empty when NVRTC had nothing to say).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub ptx: String,
    pub log: String,
}

fn cstr_vec(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `src` (named `name` in messages) for `arch`. A compile error comes back with
/// NVRTC's log; on success the log is returned too, so callers can refuse warnings.
pub fn compile(src: &str, name: &str, arch: &str) -> Result<Compiled, String> {
    use cudarc::nvrtc::result;
    if !nvrtc_present() {
        return Err("libnvrtc not found".into());
    }
    let opts = options(arch);
    let csrc = std::ffi::CString::new(src).map_err(|_| format!("{name}: NUL byte in the source"))?;
    let cname = std::ffi::CString::new(name).map_err(|_| format!("{name}: NUL byte in the name"))?;
    let run = || -> Result<Compiled, String> {
        let prog =
            result::create_program(&csrc, Some(&cname)).map_err(|e| format!("{name}: nvrtcCreateProgram: {e:?}"))?;
        // SAFETY: `prog` was just created and is destroyed once, below.
        let compiled = unsafe { result::compile_program(prog, &opts) };
        // SAFETY: as above; `prog` is alive until destroyed below.
        let log = unsafe { result::get_program_log(prog) }.map(|l| cstr_vec(&l)).unwrap_or_default();
        let out = match compiled {
            // SAFETY: as above.
            Ok(()) => unsafe { result::get_ptx(prog) }
                .map(|p| Compiled { ptx: cstr_vec(&p), log: log.trim().to_string() })
                .map_err(|e| format!("{name}: nvrtcGetPTX: {e:?}")),
            Err(e) => Err(format!("{name} ({arch}) does not compile: {e:?}\noptions: {opts:?}\n{log}")),
        };
        // SAFETY: destroyed once; nothing uses `prog` after this.
        let _ = unsafe { result::destroy_program(prog) };
        out
    };
    std::panic::catch_unwind(run)
        .unwrap_or_else(|_| Err(format!("{name}: NVRTC panicked (a symbol missing in libnvrtc?)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_resolve_once_and_every_kernel_is_defined() {
        let p = program();
        assert!(!p.contains("#include"));
        assert!(!p.contains("#pragma once"));
        assert_eq!(p.matches("// ---- common.cuh").count(), 1);
        assert_eq!(p.matches("// ---- fastmath.cuh").count(), 1);
        for k in KERNELS {
            assert!(p.contains(&format!("void {k}(")) || p.contains(&format!("{k}(")), "{k} missing");
        }
        for f in KERNEL_FILES {
            let s = source(f).unwrap();
            assert!(s.contains("ll_gemm_tile") || s.contains("ll_dot"));
        }
    }
}
