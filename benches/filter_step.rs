//! Per-bin cost of the causal filter step at the sizes of the filter-core issue.
//!
//! For each size: criterion's estimate of the step, then our own table from 20,000
//! individually timed steps (median, p99), the step's matrix arithmetic (FLOPs counted from
//! the products it actually made), the "products-only" floor (the same products, same
//! shapes, replayed alone in this process), and the update alone with the prediction made
//! ahead, as `run` does between a bin's arrival and its publication; the three are timed in
//! alternating blocks. The table is printed
//! and written to target/filter_step.md.

use criterion::{criterion_group, Criterion};
use latentloop::filter::{Filter, FilterOptions};
use latentloop::math::gemm::{self, MatRef, Op, Shape, Weights};
use latentloop::math::philox::{Normals, Purpose};
use latentloop::model::build::{self, Size};
use latentloop::model::{DynamicsKind, UpdateKind, XfadsModel};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The sizes: small, standard (mlp and gru), MC_Maze.
const CASES: [(Size, DynamicsKind); 4] = [
    (build::SMALL, DynamicsKind::Mlp),
    (build::STANDARD, DynamicsKind::Mlp),
    (build::STANDARD, DynamicsKind::Gru),
    (build::MC_MAZE, DynamicsKind::Gru),
];

fn filter_for(sz: &Size, dynamics: DynamicsKind) -> Filter {
    let model = XfadsModel::compile(&build::random(&sz.card(dynamics, UpdateKind::Encoder), 7, 0.05, 0.3)).unwrap();
    Filter::new(Arc::new(model), FilterOptions { samples: None, seed: 1 })
}

/// 512 bins of sparse counts (about 0.3 spikes per channel per bin, like 20 ms bins).
fn bins(n: usize) -> Vec<Vec<f32>> {
    let g = Normals::new(99);
    (0..512)
        .map(|t| {
            let mut v = vec![0.0; n];
            g.fill(t, Purpose::Sim, 0, &mut v);
            v.iter().map(|x| if *x > 1.0 { (*x * 1.5).floor() } else { 0.0 }).collect()
        })
        .collect()
}

/// Buffers to replay recorded products on (B in the layout the step used: weights as
/// [`Weights`] panels, so the floor is the products the step really made).
struct Replay {
    shapes: Vec<Shape>,
    bufs: Vec<(Vec<f32>, Weights, Vec<f32>)>,
}

impl Replay {
    fn new(shapes: Vec<Shape>) -> Self {
        let bufs = shapes
            .iter()
            .map(|s| (vec![0.01; s.m * s.k], Weights::new(vec![0.02; s.k * s.n], s.k, s.n), vec![0.0; s.m * s.n]))
            .collect();
        Replay { shapes, bufs }
    }
    fn run(&mut self) {
        for (s, (a, b, c)) in self.shapes.iter().zip(self.bufs.iter_mut()) {
            match s.op {
                Op::Gemm => gemm::gemm(c, s.n, MatRef::new(a, s.m, s.k), MatRef::new(b, s.k, s.n), 1.0, false),
                Op::GemmWeights => gemm::gemm_weights(c, s.n, MatRef::new(a, s.m, s.k), b, 1.0, false),
                Op::Gemv => gemm::gemv(c, a, s.m, s.k, b, 1.0, false),
                Op::GemvT => gemm::gemv_t(c, b, s.k, s.n, a, 1.0, false),
            }
        }
        black_box(&self.bufs);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6
}

fn bench(c: &mut Criterion) {
    let mut rows = Vec::new();
    for (sz, dynamics) in &CASES {
        let name = format!("{} {dynamics}", sz.name);
        let mut f = filter_for(sz, *dynamics);
        let data = bins(sz.channels);
        for y in data.iter().take(100) {
            f.step(Some(y)).unwrap();
        }
        let ((), shapes) = gemm::record(|| {
            f.step(Some(&data[0])).unwrap();
        });
        let flops: f64 = shapes.iter().map(Shape::flops).sum();
        let mut replay = Replay::new(shapes);
        let mut i = 0usize;
        c.bench_function(&format!("step/{name}"), |b| {
            b.iter(|| {
                i += 1;
                f.step(Some(&data[i % data.len()])).unwrap()
            })
        });
        c.bench_function(&format!("products-only/{name}"), |b| b.iter(|| replay.run()));
        // The three timings alternate in blocks of 200 (each warm in cache within its block),
        // so that a burst of noise from the machine's other tenants falls on all of them
        // alike and the ratios stay fair.
        let (blocks, per_block) = (100, 200);
        let n = blocks * per_block;
        let (mut steps, mut products, mut update) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..blocks {
            for _ in 0..per_block {
                i += 1;
                let t = Instant::now();
                f.step(Some(&data[i % data.len()])).unwrap();
                steps.push(t.elapsed());
            }
            for _ in 0..per_block {
                let t = Instant::now();
                replay.run();
                products.push(t.elapsed());
            }
            // What `run` has between a bin's arrival and its publication: the prediction is
            // made ahead (untimed here), only the update is timed.
            for _ in 0..per_block {
                i += 1;
                f.predict();
                let t = Instant::now();
                f.step(Some(&data[i % data.len()])).unwrap();
                update.push(t.elapsed());
            }
        }
        for v in [&mut steps, &mut products, &mut update] {
            v.sort();
        }
        let (p50, p99, floor) = (percentile(&steps, 0.5), percentile(&steps, 0.99), percentile(&products, 0.5));
        rows.push(format!(
            "| {name} | L={} N={} S={} r={} H={} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
            sz.latents,
            sz.channels,
            sz.samples,
            sz.rank,
            sz.hidden,
            flops / 1e6,
            p50,
            p99,
            flops / p50 / 1e3,
            floor,
            p50 / floor,
            percentile(&update, 0.5),
            percentile(&update, 0.99)
        ));
    }
    let table = format!(
        "| size | shape | MFLOP/step | median us | p99 us | GFLOP/s | products-only median us | step / products | update only (predict ahead) median us | p99 us |\n|---|---|---|---|---|---|---|---|---|---|\n{}\n\n{}",
        rows.join("\n"),
        normals(c)
    );
    println!("\n{table}");
    let _ = std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/target/filter_step.md"), &table);
}

/// The normal draws of one standard step (S x S, S x L and S x r), by the AVX-512 kernel and
/// by the portable code it must equal, in alternating blocks; a table row.
fn normals(c: &mut Criterion) -> String {
    let sz = build::STANDARD;
    let (s, l, r) = (sz.samples, sz.latents, sz.rank);
    let mut bufs = [vec![0f32; s * s], vec![0f32; s * l], vec![0f32; s * r]];
    let mut step = 0u64;
    let mut draw = |g: &Normals| {
        step += 1;
        for (buf, purpose) in bufs.iter_mut().zip([Purpose::PredictMix, Purpose::PredictDiag, Purpose::Update]) {
            let cols = buf.len() / s;
            g.fill_rows(step, purpose, buf, cols);
        }
        black_box(&bufs);
    };
    let (wide, portable) = (Normals::new(1), Normals::portable(1));
    c.bench_function("normals/standard", |b| b.iter(|| draw(&wide)));
    c.bench_function("normals/standard portable", |b| b.iter(|| draw(&portable)));
    let (mut tw, mut tp) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        for (g, v) in [(&wide, &mut tw), (&portable, &mut tp)] {
            for _ in 0..200 {
                let t = Instant::now();
                draw(g);
                v.push(t.elapsed());
            }
        }
    }
    tw.sort();
    tp.sort();
    let n = (s * (s + l + r)) as f64;
    let (w, p) = (percentile(&tw, 0.5), percentile(&tp, 0.5));
    // Without AVX-512 both columns time the portable code; say so rather than mislabel it.
    let wide_label =
        if latentloop::math::has_avx512() { "AVX-512 kernel" } else { "no AVX-512 on this CPU: portable code again," };
    format!(
        "| normals of a standard step | count | {wide_label} median us | ns each | portable (AVX2) code median us | portable / kernel |\n|---|---|---|---|---|---|\n| S x (S + L + r) | {n} | {w:.2} | {:.2} | {p:.2} | {:.2} |\n",
        w * 1e3 / n,
        p / w
    )
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
