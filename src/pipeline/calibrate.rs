//! Calibrate-then-run: when the config names no model, the main thread takes the first
//! `[calibration] seconds` of bins from the ring (the decode thread has not started), fits
//! the Kalman decoder on them, and the run decodes with it. Every calibration bin goes into
//! the session too (decision `calibration`).

use super::record::{RecordSlot, ToRecorder};
use super::source::{BinSlot, SlotKind};
use crate::any_model::AnyModel;
use crate::config::RigConfig;
use crate::data::{Array2, Dataset};
use crate::error::{Error, Result};
use crate::fit::kalman::{fit_dataset, KalmanFitOptions};
use crate::session::{BinFields, Decision, Shape, BIT_HAS_BEHAVIOR, BIT_RESTART};
use ringbuf::traits::{Consumer, Producer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Pops the calibration bins from the ring (returning the slots) and fits the Kalman decoder
/// on them. Returns the model and the calibration data.
pub fn calibrate(
    cfg: &RigConfig,
    ring: &mut ringbuf::HeapCons<BinSlot>,
    free: &mut ringbuf::HeapProd<BinSlot>,
    behavior_dims: usize,
    stop: &AtomicBool,
    record: Option<&crossbeam_channel::Sender<ToRecorder>>,
    quiet: bool,
) -> Result<(AnyModel, Dataset)> {
    let channels = *cfg.source.channels.get_ref();
    let bins = (*cfg.calibration.seconds.get_ref() / cfg.bin_seconds()).round() as usize;
    let bar = crate::progress::bar(bins as u64, quiet, "calibrating {bar:30} {pos}/{len} bins ({eta} left)");
    let (mut spikes, mut behavior) = (Vec::with_capacity(bins * channels), Vec::with_capacity(bins * behavior_dims));
    let mut without = 0usize;
    while spikes.len() < bins * channels {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Invalid("stopped during calibration; no decoder was fitted".into()));
        }
        let Some(slot) = ring.try_pop() else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        if let Some(tx) = record {
            let _ = tx.send(ToRecorder::Bin(Box::new(calibration_record(&slot))));
        }
        if slot.kind == SlotKind::Data {
            if slot.has_behavior {
                spikes.extend_from_slice(&slot.counts);
                behavior.extend_from_slice(&slot.behavior);
                bar.inc(1);
            } else {
                without += 1;
            }
        }
        let back = free.try_push(slot);
        debug_assert!(back.is_ok(), "the return ring holds every slot");
        if without > bins {
            return Err(Error::Invalid(format!(
                "calibration needs bins that carry behaviour ({behavior_dims} values each); {without} arrived without"
            )));
        }
    }
    bar.finish_and_clear();
    let data = Dataset {
        spikes: Array2::new(bins, channels, spikes),
        behavior: Some(Array2::new(bins, behavior_dims, behavior)),
        dt: cfg.bin_seconds() as f32,
        ..Default::default()
    };
    let opts = KalmanFitOptions { ridge: cfg.calibration.ridge, ..Default::default() };
    let model = fit_dataset(&data, &opts).map_err(Error::Invalid)?;
    Ok((AnyModel::Kalman(Arc::new(model)), data))
}

fn calibration_record(slot: &BinSlot) -> RecordSlot {
    let mut bits = if slot.has_behavior { BIT_HAS_BEHAVIOR } else { 0 };
    if slot.restart {
        bits |= BIT_RESTART;
    }
    let fields = BinFields {
        seq: slot.seq,
        source_ts: slot.source_ts,
        recv_ns: slot.recv_ns,
        push_ns: slot.push_ns,
        wire_flags: slot.wire_flags,
        decision: Decision::Calibration as u8,
        kind: slot.kind as u8,
        dtype: slot.dtype,
        bits,
        ..Default::default()
    };
    let shape = Shape { channels: slot.counts.len(), behavior_dims: slot.behavior.len(), latents: 0 };
    RecordSlot::owned(fields, shape, &slot.counts, if slot.has_behavior { &slot.behavior } else { &[] })
}
