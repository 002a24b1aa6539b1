//! latentloop's bin schema (src/wire/bin.rs) on a SUB socket.

use super::{BinSlot, Counters, Next, RejectLog, SlotKind, Source};
use crate::pipeline::clock::monotonic_ns;
use crate::wire::bin::{self, FLAG_NO_DATA, FLAG_STREAM_START};
use crate::wire::WireError;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

pub struct ZmqBinSource {
    sock: zmq::Socket,
    buf: Vec<u8>,
    channels: usize,
    behavior_dims: usize,
    max_count: f32,
    counters: Arc<Counters>,
    log: RejectLog,
}

impl ZmqBinSource {
    pub fn connect(
        ctx: &zmq::Context,
        endpoint: &str,
        channels: usize,
        behavior_dims: usize,
        max_count: f32,
        counters: Arc<Counters>,
        log: RejectLog,
    ) -> Result<Self, String> {
        let sock = ctx.socket(zmq::SUB).map_err(|e| e.to_string())?;
        sock.set_subscribe(b"").map_err(|e| e.to_string())?;
        sock.set_rcvhwm(10_000).map_err(|e| e.to_string())?;
        sock.connect(endpoint).map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
        // The largest valid message, plus one byte so that a longer one shows as longer.
        let len = bin::HEADER + 4 * (channels + behavior_dims) + 1;
        Ok(ZmqBinSource { sock, buf: vec![0; len], channels, behavior_dims, max_count, counters, log })
    }
}

impl Source for ZmqBinSource {
    fn channels(&self) -> usize {
        self.channels
    }
    fn behavior_dims(&self) -> usize {
        self.behavior_dims
    }
    fn next(&mut self, slot: &mut BinSlot, timeout: Duration) -> Next {
        match self.sock.poll(zmq::POLLIN, timeout.as_millis() as i64) {
            Ok(n) if n > 0 => {}
            _ => return Next::Idle,
        }
        let n = match self.sock.recv_into(&mut self.buf, zmq::DONTWAIT) {
            Ok(n) => n,
            Err(_) => return Next::Idle,
        };
        slot.recv_ns = monotonic_ns();
        let mut extra_frames = 0;
        while self.sock.get_rcvmore().unwrap_or(false) {
            let _ = self.sock.recv_into(&mut self.buf[..0], 0);
            extra_frames += 1;
        }
        // recv_into reports the full length of a longer message; only the header was kept.
        let msg = &self.buf[..n.min(self.buf.len())];
        let result = if extra_frames > 0 {
            Err(bin::Rejected {
                header: bin::header(msg).ok(),
                error: WireError::Length { expected: n, got: n + extra_frames },
            })
        } else if n > self.buf.len() {
            // Longer than any valid bin: name what the header says is wrong with it.
            Err(match bin::header(msg) {
                Err(error) => bin::Rejected { header: None, error },
                Ok(h) => bin::Rejected {
                    header: Some(h),
                    error: if h.channels != self.channels {
                        WireError::ChannelCount { got: h.channels, want: self.channels }
                    } else if h.behavior_dims != 0 && h.behavior_dims != self.behavior_dims {
                        WireError::BehaviorCount { got: h.behavior_dims, want: self.behavior_dims }
                    } else {
                        let expected = bin::HEADER + h.channels * h.dtype.size() + h.behavior_dims * 4;
                        WireError::Length { expected, got: n }
                    },
                },
            })
        } else {
            bin::decode(msg, &mut slot.counts, &mut slot.behavior, self.max_count)
        };
        match result {
            Ok(h) => {
                slot.seq = h.seq;
                slot.source_ts = h.source_ts;
                slot.kind = if h.flags & FLAG_NO_DATA != 0 { SlotKind::NoData } else { SlotKind::Data };
                slot.restart = h.flags & FLAG_STREAM_START != 0;
                slot.has_behavior = h.behavior_dims > 0;
                (slot.wire_flags, slot.dtype) = (h.flags, h.dtype as u8);
                Next::Bin
            }
            Err(r) => {
                let multi = extra_frames;
                self.log.reject(&self.counters, |t| match &r.header {
                    Some(h) if multi > 0 => {
                        write!(t, "bin seq {} refused: {} extra frames (one frame per bin)", h.seq, multi)
                    }
                    Some(h) => write!(t, "bin seq {} refused: {}", h.seq, r.error),
                    None => write!(t, "message of {n} bytes refused: {}", r.error),
                });
                match r.header {
                    // Known sequence number: answer it, flagged, so nothing is silently lost.
                    Some(h) => {
                        slot.seq = h.seq;
                        slot.source_ts = h.source_ts;
                        slot.kind = SlotKind::Rejected;
                        slot.restart = h.flags & FLAG_STREAM_START != 0;
                        slot.has_behavior = false;
                        (slot.wire_flags, slot.dtype) = (h.flags, h.dtype as u8);
                        Next::Bin
                    }
                    None => Next::Idle,
                }
            }
        }
    }
}
