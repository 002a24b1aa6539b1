//! Output: one decoded bin per message, published on the PUB socket.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `LLOT` |
//! | 4 | 2 | schema version (1) |
//! | 6 | 2 | flags (below) |
//! | 8 | 4 | bins dropped or missing since the previous output (u32) |
//! | 12 | 2 | behaviour dims D |
//! | 14 | 2 | latent dims L |
//! | 16 | 8 | sequence number, echoed from the input bin |
//! | 24 | 8 | source timestamp, echoed |
//! | 32 | 8 | host CLOCK_MONOTONIC ns when the bin was received (complete) |
//! | 40 | 8 | host CLOCK_MONOTONIC ns just before this message was sent |
//! | 48 | 4 | KL(q_t ‖ prediction) in nats, f32 (0 for a predict-only step) |
//! | 52 | 4 | reserved (0) |
//! | 56 | D x 4 | decoded behaviour, f32 |
//! | ... | L x 4 | filtered latent mean m_t, f32 |
//! | ... | L x 4 | lag-1 smoothed mean m_{t-1\|t}, f32 |

use super::{check_header, f32_at, u16_at, u32_at, u64_at, WireError};

pub const MAGIC: [u8; 4] = *b"LLOT";
pub const VERSION: u16 = 1;
pub const HEADER: usize = 56;
const PUBLISH_NS_AT: usize = 40;

/// No observation entered this step (the bin had no data, or was refused).
pub const FLAG_PREDICT_ONLY: u16 = 1;
/// The decoder started over from its prior at this bin.
pub const FLAG_RESET: u16 = 2;
/// The input bin was refused (malformed payload, wrong channel count, NaN, absurd value).
pub const FLAG_REJECTED: u16 = 4;
/// Bins were missing or skipped before this one (`dropped_before` says how many); the
/// decoder predicted through them, unless RESET is set too.
pub const FLAG_GAP: u16 = 8;
/// The publisher restarted (stream-start flag or sequence reset).
pub const FLAG_RESTART: u16 = 16;
/// Decoding is paused (control `pause`): the decoder keeps filtering and publishing, and
/// the task should not act on this output.
pub const FLAG_PAUSED: u16 = 32;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OutputHeader {
    pub flags: u16,
    pub dropped_before: u32,
    pub seq: u64,
    pub source_ts: u64,
    pub recv_ns: u64,
    pub publish_ns: u64,
    pub kl: f32,
}

/// Message length for D behaviour and L latent dimensions.
pub fn len(d: usize, l: usize) -> usize {
    HEADER + 4 * (d + 2 * l)
}

/// Writes a message into `out`, which must be exactly `len(D, L)` bytes (preallocated
/// once); allocates nothing.
pub fn encode(h: &OutputHeader, behavior: &[f32], latent: &[f32], lag1: &[f32], out: &mut [u8]) {
    assert_eq!(out.len(), len(behavior.len(), latent.len()));
    out[0..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&VERSION.to_le_bytes());
    out[6..8].copy_from_slice(&h.flags.to_le_bytes());
    out[8..12].copy_from_slice(&h.dropped_before.to_le_bytes());
    out[12..14].copy_from_slice(&(behavior.len() as u16).to_le_bytes());
    out[14..16].copy_from_slice(&(latent.len() as u16).to_le_bytes());
    out[16..24].copy_from_slice(&h.seq.to_le_bytes());
    out[24..32].copy_from_slice(&h.source_ts.to_le_bytes());
    out[32..40].copy_from_slice(&h.recv_ns.to_le_bytes());
    out[40..48].copy_from_slice(&h.publish_ns.to_le_bytes());
    out[48..52].copy_from_slice(&h.kl.to_le_bytes());
    out[52..56].fill(0);
    let mut o = HEADER;
    for v in behavior.iter().chain(latent).chain(lag1) {
        out[o..o + 4].copy_from_slice(&v.to_le_bytes());
        o += 4;
    }
}

/// Stamps the publish time into an encoded message (done last, right before the send).
pub fn set_publish_ns(out: &mut [u8], ns: u64) {
    out[PUBLISH_NS_AT..PUBLISH_NS_AT + 8].copy_from_slice(&ns.to_le_bytes());
}

/// A decoded output message (tools and tests).
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub header: OutputHeader,
    pub behavior: Vec<f32>,
    pub latent: Vec<f32>,
    pub lag1: Vec<f32>,
}

pub fn decode(msg: &[u8]) -> Result<Output, WireError> {
    check_header(msg, MAGIC, VERSION, HEADER)?;
    let (d, l) = (u16_at(msg, 12) as usize, u16_at(msg, 14) as usize);
    if msg.len() != len(d, l) {
        return Err(WireError::Length { expected: len(d, l), got: msg.len() });
    }
    let vals: Vec<f32> = (0..d + 2 * l).map(|i| f32_at(msg, HEADER + 4 * i)).collect();
    Ok(Output {
        header: OutputHeader {
            flags: u16_at(msg, 6),
            dropped_before: u32_at(msg, 8),
            seq: u64_at(msg, 16),
            source_ts: u64_at(msg, 24),
            recv_ns: u64_at(msg, 32),
            publish_ns: u64_at(msg, 40),
            kl: f32_at(msg, 48),
        },
        behavior: vals[..d].to_vec(),
        latent: vals[d..d + l].to_vec(),
        lag1: vals[d + l..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_publish_stamp() {
        let h = OutputHeader {
            flags: FLAG_GAP,
            dropped_before: 3,
            seq: 9,
            source_ts: 90,
            recv_ns: 5,
            publish_ns: 0,
            kl: 1.5,
        };
        let mut buf = vec![0u8; len(2, 3)];
        encode(&h, &[1.0, 2.0], &[3.0, 4.0, 5.0], &[6.0, 7.0, 8.0], &mut buf);
        set_publish_ns(&mut buf, 77);
        let o = decode(&buf).unwrap();
        assert_eq!(o.header, OutputHeader { publish_ns: 77, ..h });
        assert_eq!((o.behavior, o.latent, o.lag1), (vec![1.0, 2.0], vec![3.0, 4.0, 5.0], vec![6.0, 7.0, 8.0]));
        assert!(matches!(decode(&buf[..60]), Err(WireError::Length { .. })));
    }
}
