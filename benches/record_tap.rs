//! What recording costs the decode thread per bin: one `RecordTap::bin` (copy a bin, its
//! decision and its outputs into a preallocated slot, push it into the recorder's ring) at
//! the standard size (N = 128, D = 2, L = 32), beside a plain copy of the same bytes.
//!
//!     cargo bench --bench record_tap

use latentloop::pipeline::record::{tap, Published};
use latentloop::pipeline::source::BinSlot;
use latentloop::session::Decision;
use latentloop::wire::output::OutputHeader;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let (n, d, l) = (128, 2, 32);
    let floats = n + 2 * d + 2 * l;
    let (mut t, mut end) = tap(4096, floats, Arc::new(AtomicU64::new(0)));
    let mut slot = BinSlot::new(n, d);
    slot.counts.iter_mut().enumerate().for_each(|(j, c)| *c = (j % 5) as f32);
    let (beh, lat, lag) = (vec![0.5f32; d], vec![0.25f32; l], vec![0.125f32; l]);
    let header = OutputHeader { flags: 0, dropped_before: 0, seq: 0, source_ts: 0, recv_ns: 0, publish_ns: 0, kl: 1.0 };
    let reps = 200_000;
    let mut taps = Vec::with_capacity(reps);
    let mut copies = Vec::with_capacity(reps);
    let mut sink = vec![0f32; floats];
    for k in 0..reps {
        slot.seq = k as u64;
        let p = Published {
            header: &header,
            behavior: &beh,
            latent: &lat,
            lag1: &lag,
            step_ns: 1,
            publish_ns: 2,
            output_dropped: false,
        };
        let s = Instant::now();
        t.bin(&slot, Decision::Decoded, 0, 3, Some(&p));
        taps.push(s.elapsed().as_nanos() as f64);
        // The recorder's side, off the clock: take the record back.
        end.drain(|_| {});
        let s = Instant::now();
        sink[..n].copy_from_slice(&slot.counts);
        sink[n..n + l].copy_from_slice(&lat);
        std::hint::black_box(&sink);
        copies.push(s.elapsed().as_nanos() as f64);
    }
    let q = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p) as usize]
    };
    println!("per bin, ns (N={n}, D={d}, L={l}; {reps} bins):");
    println!("| | p50 | p99 | p99.9 |");
    println!("|---|---|---|---|");
    for (name, v) in [("RecordTap::bin", &mut taps), ("memcpy of counts + latent", &mut copies)] {
        println!("| {name} | {:.0} | {:.0} | {:.0} |", q(v, 0.5), q(v, 0.99), q(v, 0.999));
    }
}
