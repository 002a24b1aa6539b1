//! The per-bin step allocates nothing: a counting global allocator watches every step of
//! every dynamics and update kind, including predict-only and refused bins.

use latentloop::decoder::Decoder;
use latentloop::filter::{Filter, FilterOptions};
use latentloop::model::{build, Card, DynamicsKind, ReadoutKind, UpdateKind, XfadsModel};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn filter_steps_allocate_nothing() {
    let mut cases = Vec::new();
    for dynamics in DynamicsKind::ALL {
        for (update, readout) in [
            (UpdateKind::Encoder, ReadoutKind::Poisson),
            (UpdateKind::PoissonLaplace, ReadoutKind::Poisson),
            (UpdateKind::Gaussian, ReadoutKind::Gaussian),
        ] {
            let n = 12;
            let card = Card {
                latents: 5,
                channels: n,
                dt: 0.02,
                samples: 10,
                dynamics: *dynamics,
                hidden: 16,
                rmsnorm: true,
                substeps: 2,
                update,
                rank: if update == UpdateKind::Encoder { 3 } else { n },
                encoder_hidden: 8,
                readout,
                readout_latents: 4,
                behavior_dims: 2,
            };
            cases.push(Arc::new(XfadsModel::compile(&build::random(&card, 1, 0.1, 0.3)).unwrap()));
        }
    }
    let bins: Vec<Vec<f32>> = (0..20).map(|t| (0..12).map(|j| ((t + j) % 3) as f32).collect()).collect();
    let bad = vec![f32::NAN; 12];
    for model in cases {
        let mut f = Filter::new(model.clone(), FilterOptions { samples: None, seed: 1 });
        let before = ALLOCS.load(Ordering::SeqCst);
        for (t, y) in bins.iter().enumerate() {
            match t % 7 {
                3 => assert!(f.step(None).unwrap().predict_only),
                5 => assert!(f.step(Some(&bad)).is_err()),
                _ => {
                    Decoder::predict(&mut f);
                    f.step(Some(y)).unwrap();
                }
            }
        }
        let n = ALLOCS.load(Ordering::SeqCst) - before;
        assert_eq!(n, 0, "{} / {}: {n} allocations in 20 steps", model.card.dynamics, model.card.update);
    }
}
