//! The CUDA kernels, run on the CPU, against the CPU filter: bit for bit.
//!
//! kernels/*.cu are compiled as C++ together with kernels/emu/ (a fiber-per-thread emulation
//! of CUDA blocks and `__syncthreads`) by the system C++ compiler, and driven through the
//! same plan as the GPU (src/gpu/batch.rs: buffers, kernel order, grids, arguments). This
//! checks, on machines without a GPU, what the GPU test checks to 1e-4: the kernels'
//! indexing, their barriers (each step also runs with every block's threads in reverse
//! order), and that they do the CPU's arithmetic in the CPU's order. Only the host-side
//! CUDA calls (graph capture, pinned copies) and the device's own expf/logf are not covered.
//!
//! Without a C++ compiler the tests print why they skipped (LATENTLOOP_REQUIRE_EMU=1 makes
//! that a failure).

mod common;

use latentloop::decoder::{Decoder, StepInfo};
use latentloop::filter::{Filter, FilterOptions};
use latentloop::gpu::{kernels, GpuBatch, GpuFilter};
use latentloop::model::build::{Size, MC_MAZE, SMALL, STANDARD};
use latentloop::model::{DynamicsKind, UpdateKind, XfadsModel};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

#[path = "common/alloc_count.rs"]
mod alloc_count;

fn emulator() -> Option<PathBuf> {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = LIB.get_or_init(|| {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        if !Command::new(&cxx).arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
            return Err(format!("no C++ compiler ({cxx}) to build the kernel emulator"));
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-emu");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("program.cu"), kernels::program()).map_err(|e| e.to_string())?;
        let reg: String = kernels::KERNELS.iter().map(|k| format!("EMU_KERNEL({k})\n")).collect();
        std::fs::write(dir.join("registry.inc"), reg).map_err(|e| e.to_string())?;
        let lib = dir.join("libllemu.so");
        let out = Command::new(&cxx)
            .args(["-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"])
            .args(["-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-Wno-unused-parameter"])
            .arg(if cfg!(target_arch = "x86_64") { "-march=x86-64-v3" } else { "-O2" })
            .arg("-I")
            .arg(&dir)
            .arg("-I")
            .arg(root.join("kernels/emu"))
            .arg(root.join("kernels/emu/emu.cpp"))
            .arg("-o")
            .arg(&lib)
            .output()
            .map_err(|e| format!("{cxx}: {e}"))?;
        if !out.status.success() {
            panic!("the kernels do not build as C++:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(lib)
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(why) => {
            if std::env::var("LATENTLOOP_REQUIRE_EMU").as_deref() == Ok("1") {
                panic!("LATENTLOOP_REQUIRE_EMU=1 but {why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

fn same(what: &str, t: usize, a: &[f32], b: &[f32]) -> Result<(), String> {
    match a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
        None if a.len() == b.len() => Ok(()),
        None => Err(format!("bin {t}: {what} lengths {} vs {}", a.len(), b.len())),
        Some(i) => Err(format!("bin {t}: {what}[{i}] emulated {} vs cpu {}", a[i], b[i])),
    }
}

fn compare(lib: &std::path::Path, m: Arc<XfadsModel>, count: usize, reverse: bool) -> Result<usize, String> {
    let data = common::comparison_bins(
        m.channels(),
        count,
        matches!(m.readout, latentloop::model::Readout::Gaussian { .. }),
        13,
    );
    let (updates, resets) = compare_on(lib, m, &data, reverse)?;
    if count > 20 && resets != 1 {
        return Err(format!("expected the absurd bin 20 to reset the filter once, saw {resets} resets"));
    }
    Ok(updates)
}

/// Steps both filters through `data`, bit for bit; (updates, resets).
fn compare_on(
    lib: &std::path::Path,
    m: Arc<XfadsModel>,
    data: &[Option<Vec<f32>>],
    reverse: bool,
) -> Result<(usize, usize), String> {
    let opts = FilterOptions { samples: None, seed: 42 };
    let mut cpu = Filter::new(m.clone(), opts);
    let mut emu = GpuFilter::emulated(lib, m.clone(), opts, reverse)?;
    let (mut updates, mut resets) = (0, 0);
    for (t, y) in data.iter().enumerate() {
        let a: StepInfo = Decoder::step(&mut emu, y.as_deref()).map_err(|e| format!("emulated bin {t}: {e}"))?;
        let b = cpu.step(y.as_deref()).map_err(|e| format!("cpu bin {t}: {e}"))?;
        if a != b {
            return Err(format!("bin {t}: emulated {a:?} vs cpu {b:?}"));
        }
        updates += !b.predict_only as usize;
        resets += b.reset as usize;
        same("mean", t, emu.mean(), cpu.mean())?;
        same("lag1", t, emu.lag1_mean(), cpu.lag1_mean())?;
        same("behaviour", t, Decoder::behavior(&emu), Decoder::behavior(&cpu))?;
        same("samples", t, &emu.sample_matrix()?, cpu.sample_matrix())?;
    }
    Ok((updates, resets))
}

/// The breakdowns the property tests found (tests/properties.rs): an update that is finite
/// up to the Cholesky pivot and overflows after it, and a prediction carried out of range by
/// the dynamics in a bin without data. The kernels reset exactly where the CPU filter does.
#[test]
fn emulated_kernels_reset_where_the_cpu_filter_does() {
    use latentloop::model::{build, Card, ReadoutKind};
    let Some(lib) = emulator() else { return };
    let card = Card {
        latents: 3,
        channels: 6,
        dt: 0.02,
        samples: 8,
        dynamics: DynamicsKind::Node,
        hidden: 8,
        rmsnorm: false,
        substeps: 2,
        update: UpdateKind::PoissonLaplace,
        rank: 6,
        encoder_hidden: 8,
        readout: ReadoutKind::Poisson,
        readout_latents: 3,
        behavior_dims: 2,
    };
    let m = Arc::new(XfadsModel::compile(&build::random(&card, 3, 0.2, 0.5)).unwrap());
    let ones = || Some(vec![1.0f32; 6]);
    let huge = |v: f32| Some((0..6).map(|i| if i == 0 { v } else { 1.0 }).collect::<Vec<f32>>());
    let runs: Vec<Vec<Option<Vec<f32>>>> = vec![
        vec![Some(vec![1000.0; 6]), ones(), ones()],
        vec![huge(1e4), Some(vec![0.0; 6]), huge(f32::MAX), None, None, ones(), ones()],
        vec![Some(vec![10.0, 7.0, 17.0, 5.0, 6.0, 5.0]), ones(), ones(), ones(), ones(), ones()],
    ];
    let mut total = 0;
    for (i, data) in runs.iter().enumerate() {
        for reverse in [false, true] {
            let (_, resets) = compare_on(&lib, m.clone(), data, reverse).unwrap_or_else(|e| panic!("run {i}: {e}"));
            total += resets;
        }
    }
    assert!(total >= 6, "every run resets at least once ({total} resets)");
}

/// Odd shapes that cross the 32-wide tiles and the 16-term threshold of the eight-way dot
/// products (L = 20, r = N = 18).
const ODD: Size =
    Size { name: "odd", latents: 20, channels: 18, samples: 37, rank: 17, hidden: 33, encoder_hidden: 35 };

#[test]
fn emulated_kernels_equal_the_cpu_filter_bit_for_bit() {
    let Some(lib) = emulator() else { return };
    let mut failures = Vec::new();
    for (size, count) in [(SMALL, 40), (ODD, 25)] {
        for update in [UpdateKind::Encoder, UpdateKind::Gaussian, UpdateKind::PoissonLaplace] {
            for dynamics in [DynamicsKind::Gru, DynamicsKind::Mlp, DynamicsKind::Node, DynamicsKind::Linear] {
                let m = common::comparison_model(&size, dynamics, update, false);
                match compare(&lib, m, count, false) {
                    Ok(u) => eprintln!("{} {dynamics} {update}: {count} bins ({u} updates) identical", size.name),
                    Err(e) => failures.push(format!("{} {dynamics} {update}: {e}", size.name)),
                }
            }
        }
        let m = common::comparison_model(&size, DynamicsKind::Gru, UpdateKind::Encoder, true);
        if let Err(e) = compare(&lib, m, count, false) {
            failures.push(format!("{} gru+rmsnorm: {e}", size.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn emulated_kernels_do_not_depend_on_thread_order() {
    let Some(lib) = emulator() else { return };
    for (dynamics, update) in [
        (DynamicsKind::Node, UpdateKind::Encoder),
        (DynamicsKind::Gru, UpdateKind::Gaussian),
        (DynamicsKind::Mlp, UpdateKind::PoissonLaplace),
    ] {
        let m = common::comparison_model(&ODD, dynamics, update, false);
        compare(&lib, m, 12, true).unwrap_or_else(|e| panic!("{dynamics} {update}, threads in reverse: {e}"));
    }
}

#[test]
fn emulated_batch_equals_single_decoders() {
    let Some(lib) = emulator() else { return };
    let m = common::comparison_model(&SMALL, DynamicsKind::Mlp, UpdateKind::Encoder, false);
    let seeds = [3u64, 4, 1 << 40];
    let mut batch = GpuBatch::emulated(&lib, m.clone(), None, &seeds, false).unwrap();
    let mut cpus: Vec<Filter> =
        seeds.iter().map(|&seed| Filter::new(m.clone(), FilterOptions { samples: None, seed })).collect();
    let data = common::comparison_bins(m.channels(), 30, false, 13);
    let mut infos = [StepInfo { step: 0, predict_only: false, reset: false, kl: 0.0 }; 3];
    for t in 0..data.len() {
        let ys: Vec<Option<&[f32]>> = (0..3).map(|b| data[(t + 5 * b) % data.len()].as_deref()).collect();
        if t == 17 {
            batch.reset(1);
            cpus[1].reset();
        }
        batch.step(&ys, &mut infos).unwrap();
        for (b, cpu) in cpus.iter_mut().enumerate() {
            let info = cpu.step(ys[b]).unwrap();
            assert_eq!(info, infos[b], "bin {t} decoder {b}");
            same("mean", t, batch.mean(b), cpu.mean()).unwrap();
            same("lag1", t, batch.lag1_mean(b), cpu.lag1_mean()).unwrap();
            same("samples", t, &batch.sample_matrix(b).unwrap(), cpu.sample_matrix()).unwrap();
        }
    }
}

#[test]
fn emulated_gpu_steps_allocate_nothing() {
    let Some(lib) = emulator() else { return };
    for (dynamics, update) in [(DynamicsKind::Gru, UpdateKind::Encoder), (DynamicsKind::Node, UpdateKind::Gaussian)] {
        let m = common::comparison_model(&ODD, dynamics, update, true);
        let mut f = GpuFilter::emulated(&lib, m.clone(), FilterOptions { samples: None, seed: 1 }, false).unwrap();
        let data = common::comparison_bins(m.channels(), 20, update == UpdateKind::Gaussian, 13);
        let bad = vec![f32::NAN; m.channels()];
        let _ = Decoder::step(&mut f, data[0].as_deref()); // first use of the emulator's own buffers
        let before = alloc_count::on_this_thread();
        for (t, y) in data.iter().enumerate() {
            if t % 7 == 5 {
                assert!(Decoder::step(&mut f, Some(&bad)).is_err());
            } else {
                Decoder::predict(&mut f);
                Decoder::step(&mut f, y.as_deref()).unwrap();
            }
        }
        let n = alloc_count::on_this_thread() - before;
        assert_eq!(n, 0, "{dynamics} / {update}: {n} allocations in 20 steps");
    }
}

#[test]
fn emulated_kernels_equal_the_cpu_filter_at_the_reference_sizes() {
    let Some(lib) = emulator() else { return };
    let mut failures = Vec::new();
    let mut cases = Vec::new();
    for size in [STANDARD, MC_MAZE] {
        for dynamics in [DynamicsKind::Gru, DynamicsKind::Mlp, DynamicsKind::Node, DynamicsKind::Linear] {
            cases.push((size, dynamics, UpdateKind::Encoder, 30));
        }
    }
    // The exact updates have r = N: one 128 x 128 system per bin.
    cases.push((STANDARD, DynamicsKind::Mlp, UpdateKind::Gaussian, 8));
    cases.push((STANDARD, DynamicsKind::Gru, UpdateKind::PoissonLaplace, 8));
    for (size, dynamics, update, count) in cases {
        let start = std::time::Instant::now();
        match compare(&lib, common::comparison_model(&size, dynamics, update, false), count, false) {
            Ok(u) => eprintln!(
                "{} {dynamics} {update}: {count} bins ({u} updates) identical ({:.1?})",
                size.name,
                start.elapsed()
            ),
            Err(e) => failures.push(format!("{} {dynamics} {update}: {e}", size.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
