//! Every kernel compiles with NVRTC, for sm_80 (A100) and sm_90 (H100), with an empty log:
//! a warning fails the test like an error. (NVRTC 12.8 has no -Werror, only
//! --diag-error=<number> per warning, so the test reads the log.) Needs libnvrtc only, no GPU:
//!
//!     eval "$(scripts/install-nvrtc.sh /tmp/nvrtc)"   # prints the LD_LIBRARY_PATH to export
//!     cargo test --release --test gpu_nvrtc
//!
//! Without libnvrtc the test prints why it skipped, unless LATENTLOOP_REQUIRE_NVRTC=1
//! (CI sets it), when a missing libnvrtc is a failure.

use latentloop::gpu::kernels;

fn nvrtc_or_skip() -> bool {
    if kernels::nvrtc_present() {
        return true;
    }
    let msg = "libnvrtc not found (set LD_LIBRARY_PATH to the nvidia-cuda-nvrtc-cu12 wheel's lib)";
    if std::env::var("LATENTLOOP_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!("LATENTLOOP_REQUIRE_NVRTC=1 but {msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

#[test]
fn nvrtc_compiles_every_kernel_without_a_warning() {
    if !nvrtc_or_skip() {
        return;
    }
    eprintln!("NVRTC {:?}", kernels::nvrtc_version());
    let mut failures = Vec::new();
    for arch in ["sm_80", "sm_90"] {
        let mut units: Vec<(String, String)> =
            kernels::KERNEL_FILES.iter().map(|f| (f.to_string(), kernels::source(f).unwrap())).collect();
        // The program the backend loads at run time (all files in one unit) as well.
        units.push(("latentloop_kernels.cu".into(), kernels::program()));
        for (name, src) in &units {
            match kernels::compile(src, name, arch) {
                Err(e) => failures.push(format!("{name} for {arch}: {e}")),
                Ok(c) if !c.log.is_empty() => failures.push(format!("{name} for {arch}: NVRTC said:\n{}", c.log)),
                Ok(c) => {
                    for k in kernels::KERNELS {
                        let defined = c.ptx.contains(&format!(".entry {k}("));
                        let in_unit = src.contains(&format!("void {k}(")) || src.contains(&format!("\n    {k}("));
                        if in_unit && !defined {
                            failures.push(format!("{name} for {arch}: no PTX entry for {k}"));
                        }
                    }
                    eprintln!("{name} for {arch}: {} bytes of PTX, log empty", c.ptx.len());
                }
            }
        }
    }
    // Every kernel the backend launches is an entry of the run-time program.
    let all = kernels::compile(&kernels::program(), "program", "sm_90").unwrap();
    for k in kernels::KERNELS {
        if !all.ptx.contains(&format!(".entry {k}(")) {
            failures.push(format!("the run-time program has no entry {k}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn nvrtc_reports_compile_errors_with_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let err = kernels::compile("extern \"C\" __global__ void broken() { undeclared_thing(); }", "broken.cu", "sm_90")
        .unwrap_err();
    assert!(err.contains("undeclared_thing"), "{err}");
    // A warning compiles but lands in the log, which the test above requires to be empty.
    let w = kernels::compile("extern \"C\" __global__ void warns() { int unused = 1; }", "warns.cu", "sm_90").unwrap();
    assert!(w.log.contains("warning") && w.log.contains("unused"), "{:?}", w.log);
}
