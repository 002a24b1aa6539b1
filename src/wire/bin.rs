//! Input: one binned observation per message.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `LLBN` |
//! | 4 | 2 | schema version (1) |
//! | 6 | 2 | dtype of the counts: 0 = u16, 1 = u32, 2 = f32 |
//! | 8 | 4 | channel count N |
//! | 12 | 2 | flags: bit 0 no data (a missing bin), bit 1 stream start (publisher (re)started) |
//! | 14 | 2 | behaviour count D (0, or the decoder's D: calibration targets / ground truth) |
//! | 16 | 8 | sequence number (u64, +1 per bin) |
//! | 24 | 8 | source timestamp (u64: sample number or ns; echoed, never interpreted) |
//! | 32 | N x size | counts |
//! | ... | D x 4 | behaviour, f32 |

use super::{check_header, f32_at, u16_at, u32_at, u64_at, WireError};

pub const MAGIC: [u8; 4] = *b"LLBN";
pub const VERSION: u16 = 1;
pub const HEADER: usize = 32;

/// The bin carries no data: decode it as a predict-only step.
pub const FLAG_NO_DATA: u16 = 1;
/// First bin of a (re)started publisher: the decoder starts over from its prior.
pub const FLAG_STREAM_START: u16 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U16 = 0,
    U32 = 1,
    F32 = 2,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 | Dtype::F32 => 4,
        }
    }
    fn from_code(c: u16) -> Result<Dtype, WireError> {
        match c {
            0 => Ok(Dtype::U16),
            1 => Ok(Dtype::U32),
            2 => Ok(Dtype::F32),
            other => Err(WireError::Dtype(other)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BinHeader {
    pub dtype: Dtype,
    pub channels: usize,
    pub flags: u16,
    pub behavior_dims: usize,
    pub seq: u64,
    pub source_ts: u64,
}

/// A refused message; `header` is there when it could be read, so the bin can still be
/// answered (flagged) rather than silently lost.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    pub header: Option<BinHeader>,
    pub error: WireError,
}

/// Reads the header only.
pub fn header(msg: &[u8]) -> Result<BinHeader, WireError> {
    check_header(msg, MAGIC, VERSION, HEADER)?;
    Ok(BinHeader {
        dtype: Dtype::from_code(u16_at(msg, 6))?,
        channels: u32_at(msg, 8) as usize,
        flags: u16_at(msg, 12),
        behavior_dims: u16_at(msg, 14) as usize,
        seq: u64_at(msg, 16),
        source_ts: u64_at(msg, 24),
    })
}

/// Parses and validates a bin into `counts` (N) and `behavior` (the decoder's D; left
/// untouched when the bin carries none). Counts must be finite and in 0..=`max_count`.
/// Allocates nothing.
pub fn decode(msg: &[u8], counts: &mut [f32], behavior: &mut [f32], max_count: f32) -> Result<BinHeader, Rejected> {
    let h = header(msg).map_err(|error| Rejected { header: None, error })?;
    let reject = |error| Rejected { header: Some(h), error };
    if h.channels != counts.len() {
        return Err(reject(WireError::ChannelCount { got: h.channels, want: counts.len() }));
    }
    if h.behavior_dims != 0 && h.behavior_dims != behavior.len() {
        return Err(reject(WireError::BehaviorCount { got: h.behavior_dims, want: behavior.len() }));
    }
    let size = h.dtype.size();
    let expected = HEADER + h.channels * size + h.behavior_dims * 4;
    if msg.len() != expected {
        return Err(reject(WireError::Length { expected, got: msg.len() }));
    }
    let p = &msg[HEADER..];
    for (i, c) in counts.iter_mut().enumerate() {
        *c = match h.dtype {
            Dtype::U16 => u16_at(p, 2 * i) as f32,
            Dtype::U32 => u32_at(p, 4 * i) as f32,
            Dtype::F32 => f32_at(p, 4 * i),
        };
    }
    if let Some(channel) = counts.iter().position(|v| !v.is_finite()) {
        return Err(reject(WireError::NonFinite { channel, value: counts[channel] }));
    }
    if let Some(channel) = counts.iter().position(|&v| !(0.0..=max_count).contains(&v)) {
        return Err(reject(WireError::Absurd { channel, value: counts[channel], max: max_count }));
    }
    let b = &p[h.channels * size..];
    for (i, x) in behavior.iter_mut().take(h.behavior_dims).enumerate() {
        *x = f32_at(b, 4 * i);
    }
    if let Some(channel) = behavior.iter().take(h.behavior_dims).position(|v| !v.is_finite()) {
        return Err(reject(WireError::NonFinite { channel: h.channels + channel, value: behavior[channel] }));
    }
    Ok(h)
}

/// Writes a bin message (for tools and tests; the Python example does the same with struct).
pub fn encode(h: &BinHeader, counts: &[f32], behavior: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(h.dtype as u16).to_le_bytes());
    out.extend_from_slice(&(counts.len() as u32).to_le_bytes());
    out.extend_from_slice(&h.flags.to_le_bytes());
    out.extend_from_slice(&(behavior.len() as u16).to_le_bytes());
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.source_ts.to_le_bytes());
    for &c in counts {
        match h.dtype {
            Dtype::U16 => out.extend_from_slice(&(c as u16).to_le_bytes()),
            Dtype::U32 => out.extend_from_slice(&(c as u32).to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&c.to_le_bytes()),
        }
    }
    for &b in behavior {
        out.extend_from_slice(&b.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(dtype: Dtype, counts: &[f32], behavior: &[f32]) -> Vec<u8> {
        let h =
            BinHeader { dtype, channels: counts.len(), flags: 0, behavior_dims: behavior.len(), seq: 41, source_ts: 7 };
        let mut v = Vec::new();
        encode(&h, counts, behavior, &mut v);
        v
    }

    #[test]
    fn round_trip_every_dtype() {
        for dt in [Dtype::U16, Dtype::U32, Dtype::F32] {
            let m = msg(dt, &[0.0, 3.0, 65535.0], &[0.5, -1.0]);
            let (mut c, mut b) = (vec![0.0; 3], vec![0.0; 2]);
            let h = decode(&m, &mut c, &mut b, 1e6).unwrap();
            assert_eq!((h.seq, h.source_ts, h.dtype), (41, 7, dt));
            assert_eq!(c, [0.0, 3.0, 65535.0]);
            assert_eq!(b, [0.5, -1.0]);
        }
    }

    #[test]
    fn bad_messages_are_refused_with_their_reason() {
        let good = msg(Dtype::F32, &[1.0, 2.0], &[]);
        let (mut c, mut b) = (vec![0.0; 2], vec![0.0; 1]);
        let err = |m: &[u8], c: &mut [f32], b: &mut [f32]| decode(m, c, b, 100.0).unwrap_err();
        assert!(matches!(err(&good[..20], &mut c, &mut b).error, WireError::TooShort { .. }));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(err(&bad, &mut c, &mut b).error, WireError::BadMagic(_)));
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(err(&bad, &mut c, &mut b).error, WireError::Version(9));
        let r = err(&good[..good.len() - 1], &mut c, &mut b);
        assert!(matches!(r.error, WireError::Length { .. }) && r.header.unwrap().seq == 41);
        let mut c3 = vec![0.0; 3];
        assert_eq!(err(&good, &mut c3, &mut b).error, WireError::ChannelCount { got: 2, want: 3 });
        let nan = msg(Dtype::F32, &[1.0, f32::NAN], &[]);
        assert!(matches!(err(&nan, &mut c, &mut b).error, WireError::NonFinite { channel: 1, .. }));
        let neg = msg(Dtype::F32, &[-1.0, 0.0], &[]);
        assert!(matches!(err(&neg, &mut c, &mut b).error, WireError::Absurd { channel: 0, .. }));
        let huge = msg(Dtype::U32, &[1.0, 5000.0], &[]);
        assert!(matches!(err(&huge, &mut c, &mut b).error, WireError::Absurd { channel: 1, .. }));
        let wrong_d = msg(Dtype::F32, &[1.0, 2.0], &[1.0, 2.0]);
        assert!(matches!(err(&wrong_d, &mut c, &mut b).error, WireError::BehaviorCount { got: 2, want: 1 }));
    }
}
