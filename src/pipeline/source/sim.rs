//! The built-in simulated rig, paced in real time: bin k is complete at t0 + (k+1) * bin
//! width, and carries the simulator's behaviour as ground truth.

use super::{BinSlot, Next, SlotKind, Source};
use crate::pipeline::clock::monotonic_ns;
use crate::sim::{SimConfig, SimRig};
use std::time::Duration;

pub struct SimSource {
    rig: SimRig,
    bin_ns: u64,
    deadline: Option<u64>,
    seq: u64,
    rates: Vec<f32>,
    latents: Vec<f32>,
}

/// Sleep until this close to a deadline, then spin: a sleep wakes up to ~60 us late.
const SPIN_NS: u64 = 100_000;

impl SimSource {
    pub fn new(cfg: &SimConfig, bin_seconds: f64) -> Result<Self, String> {
        let rig = SimRig::new(cfg)?;
        let (n, l) = (rig.channels(), rig.latent_dims());
        Ok(SimSource {
            rig,
            bin_ns: (bin_seconds * 1e9).round() as u64,
            deadline: None,
            seq: 0,
            rates: vec![0.0; n],
            latents: vec![0.0; l],
        })
    }
}

fn wait_until(deadline: u64) {
    let now = monotonic_ns();
    if deadline > now + SPIN_NS {
        std::thread::sleep(Duration::from_nanos(deadline - now - SPIN_NS));
    }
    while monotonic_ns() < deadline {
        std::hint::spin_loop();
    }
}

impl Source for SimSource {
    fn channels(&self) -> usize {
        self.rig.channels()
    }
    fn behavior_dims(&self) -> usize {
        self.rig.behavior_dims()
    }
    fn next(&mut self, slot: &mut BinSlot, _timeout: Duration) -> Next {
        let deadline = *self.deadline.get_or_insert_with(|| monotonic_ns() + self.bin_ns);
        // The bin's spikes accumulate during the bin; it is complete at its deadline.
        self.rig.next_bin(&mut slot.counts, &mut self.rates, &mut self.latents, &mut slot.behavior);
        wait_until(deadline);
        slot.recv_ns = monotonic_ns();
        slot.seq = self.seq;
        slot.source_ts = self.seq;
        slot.kind = SlotKind::Data;
        slot.restart = self.seq == 0;
        slot.wire_flags = if slot.restart { crate::wire::bin::FLAG_STREAM_START } else { 0 };
        slot.has_behavior = true;
        self.seq += 1;
        self.deadline = Some(deadline + self.bin_ns);
        Next::Bin
    }
}
