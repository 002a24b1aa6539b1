//! Per-bin latency of the CUDA backend (one graph launch: H2D bin, every kernel, D2H
//! outputs, then the host waits for it) beside the CPU backend in the same run, at the
//! filter's reference sizes; and the throughput of a batch of 64 decoders at the standard
//! size (64 bins per launch); and where the time goes: each kernel's GPU time and the two
//! copies (events around each, the step enqueued launch by launch) against the launch floor
//! (a graph holding only the two copies). Tables printed and written to target/gpu_step.md
//! (or $LATENTLOOP_BENCH_OUT); criterion's estimate of the standard-size step follows.
//! Without a GPU: prints "skipped: no GPU".
//!
//!     cargo bench --bench gpu_step

use criterion::Criterion;
use latentloop::decoder::{Decoder, StepInfo};
use latentloop::filter::{Filter, FilterOptions};
use latentloop::gpu::{availability, GpuBatch, GpuFilter, Profile};
use latentloop::math::philox::{Normals, Purpose};
use latentloop::model::build::{self, Size};
use latentloop::model::{DynamicsKind, UpdateKind, XfadsModel};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

/// The sizes, plus big (where a GPU should pay off).
const CASES: [(Size, DynamicsKind); 5] = [
    (build::SMALL, DynamicsKind::Mlp),
    (build::STANDARD, DynamicsKind::Mlp),
    (build::STANDARD, DynamicsKind::Gru),
    (build::MC_MAZE, DynamicsKind::Gru),
    (build::BIG, DynamicsKind::Mlp),
];

fn model(sz: &Size, dynamics: DynamicsKind) -> Arc<XfadsModel> {
    Arc::new(XfadsModel::compile(&build::random(&sz.card(dynamics, UpdateKind::Encoder), 7, 0.05, 0.3)).unwrap())
}

/// 512 bins of sparse counts (about 0.3 spikes per channel per bin).
fn bins(n: usize) -> Vec<Vec<f32>> {
    let g = Normals::new(99);
    (0..512)
        .map(|t| {
            let mut v = vec![0.0f32; n];
            g.fill(t, Purpose::Sim, 0, &mut v);
            v.iter_mut().for_each(|x| {
                *x = if *x > 1.1 {
                    2.0
                } else if *x > 0.5 {
                    1.0
                } else {
                    0.0
                }
            });
            v
        })
        .collect()
}

/// p50 and p99 in microseconds of `steps` individually timed calls.
fn percentiles(steps: usize, mut f: impl FnMut(usize)) -> (f64, f64) {
    for i in 0..200 {
        f(i);
    }
    let mut t: Vec<f64> = (0..steps)
        .map(|i| {
            let s = Instant::now();
            f(i);
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (t[t.len() / 2], t[t.len() * 99 / 100])
}

/// The profile's columns: floor, enqueued, item total, items grouped by kernel in order.
fn describe(p: &Profile) -> String {
    let mut groups: Vec<(&str, f64, usize)> = Vec::new();
    for &(name, t) in &p.items {
        match groups.iter_mut().find(|g| g.0 == name) {
            Some(g) => (g.1, g.2) = (g.1 + t, g.2 + 1),
            None => groups.push((name, t, 1)),
        }
    }
    let items: Vec<String> = groups
        .iter()
        .map(|(n, t, k)| if *k > 1 { format!("{n} {t:.1} (x{k})") } else { format!("{n} {t:.1}") })
        .collect();
    let total: f64 = p.items.iter().map(|i| i.1).sum();
    format!("{:.1} | {:.1} | {total:.1} | {}", p.copies_graph, p.enqueued, items.join(", "))
}

fn main() {
    let info = match availability() {
        Ok(i) => i,
        Err(why) => {
            println!("skipped: no GPU ({why})");
            return;
        }
    };
    let mut md = format!(
        "# gpu_step: {} (cc {}.{}), driver {}, NVRTC {}.{}\n\n| size | CPU p50 us | CPU p99 us | GPU p50 us | GPU p99 us | CPU / GPU (p50) |\n| --- | --- | --- | --- | --- | --- |\n",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.driver_version,
        info.nvrtc_version.0,
        info.nvrtc_version.1
    );
    let mut breakdown = String::from(
        "\n## Where the time goes (medians, us)\n\n| size | graph launch + wait | copies-only graph (floor) | enqueued without a graph | GPU time of the items | items (GPU us; xN: N launches) |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for (sz, dynamics) in &CASES {
        let m = model(sz, *dynamics);
        let data = bins(sz.channels);
        let opts = FilterOptions { samples: None, seed: 1 };
        let steps = if sz.latents > 100 { 2_000 } else { 10_000 };
        let mut cpu = Filter::new(m.clone(), opts);
        let (c50, c99) = percentiles(steps, |i| {
            cpu.step(Some(&data[i % data.len()])).unwrap();
        });
        let mut gpu = GpuFilter::new(m.clone(), opts).unwrap();
        let (g50, g99) = percentiles(steps, |i| {
            Decoder::step(&mut gpu, Some(&data[i % data.len()])).unwrap();
        });
        let line =
            format!("| {} {dynamics} | {c50:.1} | {c99:.1} | {g50:.1} | {g99:.1} | {:.1} |\n", sz.name, c50 / g50);
        print!("{line}");
        md.push_str(&line);
        // The profile replays the last step's inputs: a bin with data, past the first step.
        let mut own = GpuBatch::new(m.clone(), None, &[1]).unwrap();
        let mut info = [StepInfo { step: 0, predict_only: false, reset: false, kl: 0.0 }];
        for y in &data[..2] {
            own.step(&[Some(y)], &mut info).unwrap();
        }
        let p = own.profile(if sz.latents > 100 { 300 } else { 1_000 }).unwrap();
        breakdown.push_str(&format!("| {} {dynamics} | {g50:.1} | {} |\n", sz.name, describe(&p)));
    }
    print!("{breakdown}");
    md.push_str(&breakdown);

    // Throughput: 64 decoders at the standard size, one launch per bin for all of them.
    let sz = &build::STANDARD;
    let m = model(sz, DynamicsKind::Mlp);
    let data = bins(sz.channels);
    let seeds: Vec<u64> = (0..64).collect();
    let mut batch = GpuBatch::new(m.clone(), None, &seeds).unwrap();
    let mut infos = vec![StepInfo { step: 0, predict_only: false, reset: false, kl: 0.0 }; 64];
    let mut ys: Vec<Option<&[f32]>> = vec![None; 64];
    let (b50, b99) = percentiles(2_000, |i| {
        for (b, y) in ys.iter_mut().enumerate() {
            *y = Some(&data[(i + b) % data.len()]);
        }
        batch.step(&ys, &mut infos).unwrap();
    });
    let mut cpu = Filter::new(m, FilterOptions { samples: None, seed: 1 });
    let (c50, _) = percentiles(2_000, |i| {
        cpu.step(Some(&data[i % data.len()])).unwrap();
    });
    let _ = write!(
        md,
        "\nbatch of 64 standard mlp decoders: p50 {b50:.1} us, p99 {b99:.1} us per launch = {:.0} decoder-bins/s (one CPU core: {:.0})\n",
        64.0 * 1e6 / b50,
        1e6 / c50
    );
    print!("{}", md.lines().last().unwrap_or_default());
    println!();
    let path = std::env::var_os("LATENTLOOP_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/gpu_step.md"));
    let _ = std::fs::write(&path, &md);

    let mut c = Criterion::default().configure_from_args();
    let m = model(&build::STANDARD, DynamicsKind::Mlp);
    let data = bins(build::STANDARD.channels);
    let mut gpu = GpuFilter::new(m, FilterOptions { samples: None, seed: 1 }).unwrap();
    let mut i = 0usize;
    c.bench_function("gpu step standard mlp", |b| {
        b.iter(|| {
            i += 1;
            Decoder::step(&mut gpu, Some(&data[i % data.len()])).unwrap()
        })
    });
    c.final_summary();
}
