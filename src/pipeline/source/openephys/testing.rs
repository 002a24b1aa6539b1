//! Messages as the plugin sends them, for tests and tools (they allocate).

use super::protocol::{DATA_ENVELOPE, EVENT_ENVELOPE};

/// A continuous-data message as the plugin sends it (tests and tools; allocates).
pub fn data_message(
    message_num: u64,
    stream: &str,
    channel: usize,
    sample_num: i64,
    sample_rate: f64,
    samples: &[f32],
) -> Vec<Vec<u8>> {
    let json = serde_json::json!({
        "message_num": message_num,
        "type": "data",
        "content": {
            "stream": stream,
            "channel_num": channel,
            "channel_name": format!("CH{}", channel + 1),
            "num_samples": samples.len(),
            "sample_num": sample_num,
            "sample_rate": sample_rate,
        },
        "data_size": samples.len() * 4,
        "timestamp": 1_700_000_000_000u64,
    });
    let payload = samples.iter().flat_map(|v| v.to_le_bytes()).collect();
    vec![DATA_ENVELOPE.to_vec(), serde_json::to_vec_pretty(&json).expect("json"), payload]
}

/// A spike event as the plugin sends it (tests and tools; the waveform is zeros).
pub fn spike_message(
    message_num: u64,
    stream: &str,
    electrode: &str,
    sample_num: i64,
    num_channels: usize,
    num_samples: usize,
) -> Vec<Vec<u8>> {
    let json = serde_json::json!({
        "message_num": message_num,
        "type": "spike",
        "spike": {
            "stream": stream,
            "source_node": 104,
            "electrode": electrode,
            "sample_num": sample_num,
            "num_channels": num_channels,
            "num_samples": num_samples,
            "sorted_id": 0,
            "threshold": vec![-50.0; num_channels],
        },
        "timestamp": 1_700_000_000_000u64,
    });
    let waveform = vec![0u8; 4 * num_channels * num_samples];
    vec![EVENT_ENVELOPE.to_vec(), serde_json::to_vec_pretty(&json).expect("json"), waveform]
}

/// A TTL event as the plugin sends it: 10 bytes of data (line, state, u64 word at 2).
pub fn ttl_message(message_num: u64, stream: &str, sample_num: i64, line: u8, on: bool) -> Vec<Vec<u8>> {
    let json = serde_json::json!({
        "message_num": message_num,
        "type": "event",
        "content": { "stream": stream, "source_node": 100, "type": 3, "sample_num": sample_num },
        "data_size": 10,
        "timestamp": 1_700_000_000_000u64,
    });
    let mut data = vec![line, on as u8];
    data.extend_from_slice(&(if on { 1u64 << line } else { 0 }).to_le_bytes());
    vec![EVENT_ENVELOPE.to_vec(), serde_json::to_vec_pretty(&json).expect("json"), data]
}
