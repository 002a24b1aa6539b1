//! The recent decoded bins, as the control thread sees them (fed by the decode thread
//! through a record ring): what `calibrate` fits on and what adaptation learns from. Bounded:
//! the oldest bins go first.

use crate::data::{Array2, Dataset};
use crate::pipeline::record::RecordSlot;
use crate::session::{Decision, BIT_HAS_BEHAVIOR};
use std::collections::VecDeque;

/// One decoded bin.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Running number of the bins this history has seen (adaptation's cursor).
    pub index: u64,
    pub seq: u64,
    pub counts: Vec<f32>,
    /// The behaviour the bin carried (the task's or the simulator's: calibration targets).
    pub behavior: Option<Vec<f32>>,
    /// What the decoder published.
    pub decoded: Vec<f32>,
    /// The decoder's filtered state mean.
    pub latent: Vec<f32>,
    pub flags: u16,
}

pub struct History {
    cap: usize,
    channels: usize,
    behavior_dims: usize,
    entries: VecDeque<Entry>,
    seen: u64,
}

impl History {
    pub fn new(cap: usize, channels: usize, behavior_dims: usize) -> Self {
        History { cap: cap.max(1), channels, behavior_dims, entries: VecDeque::new(), seen: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Bins seen so far (the index the next one will get).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Takes a decoded bin's record (others are ignored).
    pub fn push(&mut self, r: &RecordSlot) {
        if r.applied.is_some() || r.fields.decision != Decision::Decoded as u8 {
            return;
        }
        let a = r.arrays();
        let has = r.fields.bits & BIT_HAS_BEHAVIOR != 0 && a.behavior_in.len() == self.behavior_dims;
        self.push_entry(Entry {
            index: 0,
            seq: r.fields.seq,
            counts: a.counts.to_vec(),
            behavior: has.then(|| a.behavior_in.to_vec()),
            decoded: a.behavior_out.to_vec(),
            latent: a.latent.to_vec(),
            flags: r.fields.out_flags,
        });
    }

    pub fn push_entry(&mut self, mut e: Entry) {
        e.index = self.seen;
        self.seen += 1;
        if self.entries.len() == self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
    }

    /// The entries numbered `from` or later that are still held.
    pub fn since(&self, from: u64) -> impl Iterator<Item = &Entry> {
        let first = self.entries.front().map_or(0, |e| e.index);
        self.entries.iter().skip(from.saturating_sub(first) as usize)
    }

    /// The last `bins` bins that carried behaviour, as a data set for a fit.
    pub fn dataset(&self, bins: usize, dt: f32) -> Result<Dataset, String> {
        let with: Vec<&Entry> = self.entries.iter().filter(|e| e.behavior.is_some()).collect();
        let take = bins.min(with.len());
        if take < 100 {
            return Err(format!(
                "calibration needs at least 100 bins that carried behaviour; the last {} bins held {} ({} wanted)",
                self.entries.len(),
                with.len(),
                bins
            ));
        }
        let rows = &with[with.len() - take..];
        let spikes: Vec<f32> = rows.iter().flat_map(|e| e.counts.iter().copied()).collect();
        let behavior: Vec<f32> =
            rows.iter().flat_map(|e| e.behavior.as_ref().expect("filtered").iter().copied()).collect();
        Ok(Dataset {
            spikes: Array2::new(take, self.channels, spikes),
            behavior: Some(Array2::new(take, self.behavior_dims, behavior)),
            dt,
            ..Default::default()
        })
    }
}
