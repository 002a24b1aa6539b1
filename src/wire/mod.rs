//! latentloop's own message schemas (documented in docs/WIRE.md, mirrored by the Python
//! examples in examples/python/): one binned observation in, one decoded bin out. All
//! little-endian, one ZeroMQ frame each, fixed-size headers so a C or Python peer needs only
//! `struct`.

pub mod bin;
pub mod output;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("message of {len} bytes is shorter than the {header}-byte header")]
    TooShort { len: usize, header: usize },
    #[error("bad magic {0:02x?} (not a latentloop message)")]
    BadMagic([u8; 4]),
    #[error("schema version {0} is not supported (this build speaks version 1)")]
    Version(u16),
    #[error("unknown dtype code {0} (0 = u16, 1 = u32, 2 = f32)")]
    Dtype(u16),
    #[error("payload is {got} bytes, header implies {expected}")]
    Length { expected: usize, got: usize },
    #[error("bin has {got} channels, the decoder expects {want}")]
    ChannelCount { got: usize, want: usize },
    #[error("bin carries {got} behaviour values, the decoder expects {want} (or 0)")]
    BehaviorCount { got: usize, want: usize },
    #[error("channel {channel} is not finite ({value})")]
    NonFinite { channel: usize, value: f32 },
    #[error("channel {channel} has an absurd value {value} (allowed 0..={max})")]
    Absurd { channel: usize, value: f32, max: f32 },
}

/// Length, magic and schema version, the same for both schemas.
pub(crate) fn check_header(msg: &[u8], magic: [u8; 4], version: u16, header: usize) -> Result<(), WireError> {
    if msg.len() < header {
        return Err(WireError::TooShort { len: msg.len(), header });
    }
    let got: [u8; 4] = msg[0..4].try_into().unwrap();
    if got != magic {
        return Err(WireError::BadMagic(got));
    }
    match u16_at(msg, 4) {
        v if v == version => Ok(()),
        v => Err(WireError::Version(v)),
    }
}

pub(crate) fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
pub(crate) fn f32_at(b: &[u8], o: usize) -> f32 {
    f32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
