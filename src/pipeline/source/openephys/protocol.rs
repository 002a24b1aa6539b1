//! The ZMQ Interface plugin's messages: the JSON header (parsed into structs that borrow
//! from the received frame, so reading a message allocates nothing) and the frames of one
//! message. The format was read from the plugin's source (Source/ZmqInterface.cpp, v1.0.0).

use serde::de::{Deserializer, Visitor};
use serde::Deserialize;
use std::borrow::Cow;

/// First frame of a continuous-data message (NUL included, as the plugin sends it).
pub const DATA_ENVELOPE: &[u8] = b"DATA\0";
/// First frame of spike and TTL event messages.
pub const EVENT_ENVELOPE: &[u8] = b"EVENT\0";

/// A JSON string: borrowed from the message, owned only when it contains escapes (a plain
/// `&str` field would refuse those).
pub(super) struct Text<'a>(pub(super) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(V).map(Text)
    }
}

/// Fields the decoder uses; the rest (timestamp, channel_name, source_node, sorted_id,
/// threshold, ...) are skipped without being stored.
#[derive(Deserialize)]
pub(super) struct Header<'a> {
    pub(super) message_num: u64,
    #[serde(rename = "type", borrow)]
    pub(super) kind: Text<'a>,
    #[serde(default, borrow)]
    pub(super) content: Option<Content<'a>>,
    #[serde(default, borrow)]
    pub(super) spike: Option<SpikeInfo<'a>>,
    #[serde(default)]
    pub(super) data_size: Option<i64>,
}

/// `content` of a data message (channel_num, num_samples, sample_num, sample_rate) or of a
/// TTL event (sample_num).
#[derive(Deserialize)]
pub(super) struct Content<'a> {
    #[serde(default, borrow)]
    pub(super) stream: Option<Text<'a>>,
    #[serde(default)]
    pub(super) channel_num: Option<i64>,
    #[serde(default)]
    pub(super) num_samples: Option<i64>,
    #[serde(default)]
    pub(super) sample_num: Option<i64>,
    #[serde(default)]
    pub(super) sample_rate: Option<f64>,
}

#[derive(Deserialize)]
pub(super) struct SpikeInfo<'a> {
    #[serde(default, borrow)]
    pub(super) stream: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub(super) electrode: Option<Text<'a>>,
    #[serde(default)]
    pub(super) sample_num: Option<i64>,
    #[serde(default)]
    pub(super) num_channels: Option<i64>,
    #[serde(default)]
    pub(super) num_samples: Option<i64>,
}

/// One received message: its first three frames and how many it had.
#[derive(Clone, Copy, Debug)]
pub struct Frames<'a> {
    pub envelope: &'a [u8],
    pub header: &'a [u8],
    pub payload: &'a [u8],
    /// Frames the message had (only the first three are kept).
    pub count: usize,
    /// A frame was longer than its receive buffer and was cut.
    pub truncated: bool,
}

impl<'a> Frames<'a> {
    /// A message from its parts (tests and tools).
    pub fn from_parts(parts: &'a [Vec<u8>]) -> Frames<'a> {
        let get = |i: usize| parts.get(i).map_or(&[][..], |p| &p[..]);
        Frames { envelope: get(0), header: get(1), payload: get(2), count: parts.len(), truncated: false }
    }
}

pub(super) fn trim_nul(b: &[u8]) -> &[u8] {
    let mut b = b;
    while let [rest @ .., 0] = b {
        b = rest;
    }
    b
}

/// Bytes shown as text in a log line (first 200).
pub(super) struct Lossy<'a>(pub(super) &'a [u8]);

impl std::fmt::Debug for Lossy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let b = &self.0[..self.0.len().min(200)];
        write!(f, "{:?}", String::from_utf8_lossy(b))
    }
}
