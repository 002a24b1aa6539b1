//! The Open Ephys adapter message by message (and the binning layer through it).

use super::*;
use crate::pipeline::source::SlotKind;

struct Bin {
    seq: u64,
    ts: u64,
    restart: bool,
    counts: Vec<f32>,
}

fn settings(mode: Mode, n: usize, bin_ms: f64) -> Settings {
    Settings {
        channels: n,
        bin_ms,
        mode,
        stream: None,
        threshold: 4.0,
        noise_seconds: 0.1,
        refractory_ms: 3.0,
        electrodes: Vec::new(),
    }
}

fn binner(set: Settings) -> (Binner, Arc<Counters>, crossbeam_channel::Receiver<crate::pipeline::source::LogLine>) {
    let counters = Arc::new(Counters::default());
    let (tx, rx) = crossbeam_channel::bounded(64);
    (Binner::new(set, counters.clone(), RejectLog::new(tx)), counters, rx)
}

/// The next refusal the binner logged (warnings passed over).
fn next_rejection(rx: &crossbeam_channel::Receiver<crate::pipeline::source::LogLine>) -> String {
    loop {
        match rx.try_recv().expect("a refusal was logged") {
            crate::pipeline::source::LogLine::Rejected(t) => return t.to_string(),
            crate::pipeline::source::LogLine::Warning(_) => {}
        }
    }
}

/// Handles one message and takes every bin it finished.
fn feed(b: &mut Binner, parts: Vec<Vec<u8>>) -> Vec<Bin> {
    b.handle(&Frames::from_parts(&parts), 7);
    let mut slot = BinSlot::new(b.channels(), 0);
    let mut out = Vec::new();
    while b.pop(&mut slot) {
        assert_eq!(slot.kind, SlotKind::Data);
        assert_eq!(slot.recv_ns, 7);
        out.push(Bin { seq: slot.seq, ts: slot.source_ts, restart: slot.restart, counts: slot.counts.to_vec() });
    }
    out
}

/// Noise of |x| = 0.5 everywhere: sd = 0.5 / 0.6745, never near a threshold of 4 sd.
fn quiet_signal(t0: i64, len: usize) -> Vec<f32> {
    (0..len).map(|i| if (t0 + i as i64) % 2 == 0 { 0.5 } else { -0.5 }).collect()
}

/// Feeds `channels` channels from sample `from` to `to` in blocks of `block`, with
/// spikes (-10 for one sample) at the given (channel, sample) pairs; returns the bins.
struct Feeder {
    num: u64,
    block: usize,
    rate: f64,
}

impl Feeder {
    fn run(&mut self, b: &mut Binner, chans: &[usize], from: i64, to: i64, spikes: &[(usize, i64)]) -> Vec<Bin> {
        let mut out = Vec::new();
        let mut s = from;
        while s < to {
            let len = (self.block as i64).min(to - s) as usize;
            for &c in chans {
                let mut x = quiet_signal(s, len);
                for &(sc, st) in spikes {
                    if sc == c && st >= s && st < s + len as i64 {
                        x[(st - s) as usize] = -10.0;
                    }
                }
                self.num += 1;
                out.extend(feed(b, data_message(self.num, "s", c, s, self.rate, &x)));
            }
            s += len as i64;
        }
        out
    }
}

#[test]
fn continuous_counts_crossings_exactly_per_bin() {
    // 1 kHz, 10 ms bins = 10 samples; 100 samples of warm-up; blocks of 25 samples
    // (not aligned with bins); refractory 3 samples.
    let (mut b, counters, _rx) = binner(settings(Mode::Continuous, 2, 10.0));
    let mut f = Feeder { num: 0, block: 25, rate: 1000.0 };
    let warm = f.run(&mut b, &[0, 1], 1000, 1100, &[]);
    assert!(warm.is_empty());
    assert_eq!(b.noise_sd(0), Some(0.5 / 0.6745));
    assert_eq!(b.origin(), None);
    // The first block after the warm-up sets the origin: 1100.
    let spikes = [
        (0, 1100), // bin 0, first sample
        (0, 1109), // bin 0, last sample (9 samples later: outside the refractory)
        (1, 1112), // bin 1
        (1, 1114), // 2 samples later, back above the level in between: refractory
        (1, 1117), // 5 samples after 1112: counted, bin 1
        (0, 1124), // bin 2, last sample of a block
        (0, 1126), // refractory across the block boundary: not counted
        (1, 1150), // bin 5
    ];
    let bins = f.run(&mut b, &[0, 1], 1100, 1200, &spikes);
    assert_eq!(b.origin(), Some(1100));
    assert_eq!(bins.len(), 10);
    for (k, bin) in bins.iter().enumerate() {
        assert_eq!(bin.seq, k as u64);
        assert_eq!(bin.ts, 1100 + 10 * k as u64);
        assert!(!bin.restart);
    }
    let counts: Vec<[f32; 2]> = bins.iter().map(|b| [b.counts[0], b.counts[1]]).collect();
    assert_eq!(counts[0], [2.0, 0.0]);
    assert_eq!(counts[1], [0.0, 2.0]);
    assert_eq!(counts[2], [1.0, 0.0]);
    assert_eq!(counts[5], [0.0, 1.0]);
    let total: f32 = counts.iter().map(|c| c[0] + c[1]).sum();
    assert_eq!(total, 6.0);
    assert_eq!(Counters::get(&counters.rejected), 0);
    assert_eq!(Counters::get(&counters.lost_messages), 0);
}

#[test]
fn only_negative_going_crossings_count() {
    let (mut b, _, _rx) = binner(settings(Mode::Continuous, 1, 10.0));
    let mut f = Feeder { num: 0, block: 50, rate: 1000.0 };
    f.run(&mut b, &[0], 0, 100, &[]);
    // A long excursion below the level counts once; a large positive one never.
    let mut x = quiet_signal(100, 50);
    x[5..25].fill(-9.0);
    x[30..40].fill(9.0);
    f.num += 1;
    let bins = feed(&mut b, data_message(f.num, "s", 0, 100, 1000.0, &x));
    assert_eq!(bins.len(), 5);
    let total: f32 = bins.iter().map(|b| b.counts[0]).sum();
    assert_eq!(total, 1.0);
    assert_eq!(bins[0].counts[0], 1.0);
}

#[test]
fn a_bin_waits_for_every_channel_and_one_message_can_finish_several() {
    let (mut b, _, _rx) = binner(settings(Mode::Continuous, 3, 10.0));
    let mut f = Feeder { num: 0, block: 50, rate: 1000.0 };
    f.run(&mut b, &[0, 1, 2], 0, 100, &[]);
    // One block of 50 samples = 5 bins: nothing until the last channel delivers it.
    let mut out = Vec::new();
    for c in 0..3 {
        f.num += 1;
        let bins = feed(&mut b, data_message(f.num, "s", c, 100, 1000.0, &quiet_signal(100, 50)));
        if c < 2 {
            assert!(bins.is_empty(), "channel {c}");
        }
        out.extend(bins);
    }
    assert_eq!(out.iter().map(|b| b.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    // A partial bin stays until all channels are past its end.
    f.block = 15;
    let bins = f.run(&mut b, &[0, 1, 2], 150, 165, &[]);
    assert_eq!(bins.iter().map(|b| b.seq).collect::<Vec<_>>(), [5]);
    assert_eq!(b.stats().binning.forced_bins, 0);
}

#[test]
fn a_stale_channel_holds_bins_back_only_so_long() {
    let (mut b, _, _rx) = binner(settings(Mode::Continuous, 2, 10.0));
    let mut f = Feeder { num: 0, block: 20, rate: 1000.0 };
    f.run(&mut b, &[0, 1], 0, 100, &[]);
    let bins = f.run(&mut b, &[0, 1], 100, 200, &[(0, 105)]);
    assert_eq!(bins.len(), 10);
    // Channel 1 stops. Blocks of 20 samples, 2 stale bins: bin k (ending at
    // 100 + 10(k+1)) is emitted once channel 0 reaches its end + 20 + 20.
    let mut got = Vec::new();
    for s in (200..300).step_by(20) {
        let bins = f.run(&mut b, &[0], s, s + 20, &[(0, s + 3)]);
        got.extend(bins.iter().map(|b| (b.seq, b.counts[0])));
        // Every bin ending 40 samples (a block + 2 bins) before channel 0's end is out.
        let end_of_last_emitted = got.last().map_or(200, |&(k, _)| 100 + 10 * (k as i64 + 1));
        assert_eq!(end_of_last_emitted, (s - 20).max(200), "{s}: {got:?}");
    }
    assert_eq!(got.first().unwrap().0, 10);
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), (10..16).collect::<Vec<_>>());
    // Crossings of channel 0 still land in their bins: at 203, 223, 243, 263.
    assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
    assert_eq!(b.stats().binning.stale, [0, 6]);
    assert_eq!(b.stats().binning.forced_bins, 6);
    // Channel 1 comes back after a gap: binning goes on with both.
    let bins = f.run(&mut b, &[1, 0], 300, 320, &[(1, 305)]);
    assert!(bins.iter().all(|b| b.seq >= 16));
}

#[test]
fn message_num_gaps_are_lost_messages_and_a_step_back_restarts() {
    let (mut b, counters, _rx) = binner(settings(Mode::Continuous, 1, 10.0));
    let mut f = Feeder { num: 100, block: 10, rate: 1000.0 }; // joined mid-acquisition
    f.run(&mut b, &[0], 0, 150, &[]);
    assert_eq!(Counters::get(&counters.lost_messages), 0);
    f.num += 3; // three messages lost
    let bins = f.run(&mut b, &[0], 160, 170, &[]);
    assert_eq!(Counters::get(&counters.lost_messages), 3);
    assert_eq!(b.stats().binning.gaps, 1);
    // Bin 5 (150..160) had no data at all: skipped, so the decoder sees the gap.
    assert_eq!(bins.iter().map(|b| b.seq).collect::<Vec<_>>(), [6]);
    assert_eq!(b.stats().binning.skipped_bins, 1);
    // A TTL event counts in message_num.
    f.num += 1;
    assert!(feed(&mut b, ttl_message(f.num, "s", 165, 1, true)).is_empty());
    let bins = f.run(&mut b, &[0], 170, 180, &[]);
    assert_eq!(Counters::get(&counters.lost_messages), 3);
    assert_eq!(bins.iter().map(|b| b.seq).collect::<Vec<_>>(), [7]);
    // Acquisition restarts: message_num from 1, sample numbers from 0; the noise estimate
    // is kept, so binning starts at once at the first block.
    let sd = b.noise_sd(0);
    f.num = 0;
    let bins = f.run(&mut b, &[0], 0, 30, &[(0, 12)]);
    assert_eq!(b.stats().restarts, 1);
    assert_eq!(b.origin(), Some(0));
    assert_eq!(b.noise_sd(0), sd);
    assert_eq!(
        bins.iter().map(|b| (b.seq, b.ts, b.restart)).collect::<Vec<_>>(),
        [(0, 0, true), (1, 10, false), (2, 20, false)]
    );
    assert_eq!(bins[1].counts[0], 1.0);
    assert_eq!(Counters::get(&counters.lost_messages), 3);
    // A restart whose first messages were missed counts them lost.
    f.num = 2;
    f.run(&mut b, &[0], 0, 10, &[]);
    assert_eq!(b.stats().restarts, 2);
    assert_eq!(Counters::get(&counters.lost_messages), 5);
}

#[test]
fn malformed_messages_are_refused_with_a_reason() {
    let (mut b, counters, rx) = binner(settings(Mode::Continuous, 2, 10.0));
    let good = data_message(1, "s", 0, 0, 1000.0, &[0.5; 10]);
    let two_frames = data_message(12, "s", 0, 0, 1000.0, &[0.5; 10])[..2].to_vec();
    let json = |s: &str| vec![DATA_ENVELOPE.to_vec(), s.as_bytes().to_vec(), vec![0; 40]];
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (vec![good[0].clone()], "1 frame"),
        (vec![good[0].clone(), good[1].clone(), good[2].clone(), vec![]], "4 frames"),
        (vec![b"DAT".to_vec(), good[1].clone(), good[2].clone()], "envelope"),
        (json("{\"message_num\": 2, \"type\": \"data\", "), "bad JSON"),
        (json("[1, 2]"), "bad JSON"),
        (json("{\"type\": \"data\"}"), "bad JSON"), // no message_num
        (json("{\"message_num\": 3, \"type\": \"data\", \"data_size\": 40}"), "no 'content'"),
        (
            json(
                "{\"message_num\": 4, \"type\": \"data\", \"data_size\": 40, \"content\": {\"channel_num\": 0, \
                 \"sample_num\": 0, \"sample_rate\": 1000.0}}",
            ),
            "no content.num_samples",
        ),
        (
            json(
                "{\"message_num\": 5, \"type\": \"data\", \"data_size\": 40, \"content\": {\"channel_num\": 0, \
                 \"num_samples\": 10, \"sample_num\": \"zero\", \"sample_rate\": 1000.0}}",
            ),
            "bad JSON",
        ),
        (
            json(
                "{\"message_num\": 6, \"type\": \"data\", \"data_size\": 44, \"content\": {\"channel_num\": 0, \
                 \"num_samples\": 10, \"sample_num\": 0, \"sample_rate\": 1000.0}}",
            ),
            "data_size 44 != num_samples 10 x 4",
        ),
        (
            json(
                "{\"message_num\": 7, \"type\": \"data\", \"data_size\": 48, \"content\": {\"channel_num\": 0, \
                 \"num_samples\": 12, \"sample_num\": 0, \"sample_rate\": 1000.0}}",
            ),
            "payload of 40 bytes, data_size 48",
        ),
        (
            json(
                "{\"message_num\": 8, \"type\": \"data\", \"content\": {\"channel_num\": 0, \
                 \"num_samples\": 10, \"sample_num\": 0, \"sample_rate\": 1000.0}}",
            ),
            "no data_size",
        ),
        (
            json(
                "{\"message_num\": 9, \"type\": \"data\", \"data_size\": 40, \"content\": {\"channel_num\": -1, \
                 \"num_samples\": 10, \"sample_num\": 0, \"sample_rate\": 1000.0}}",
            ),
            "channel_num -1",
        ),
        (
            json(
                "{\"message_num\": 10, \"type\": \"data\", \"data_size\": 40, \"content\": {\"channel_num\": 0, \
                 \"num_samples\": 10, \"sample_num\": 0, \"sample_rate\": 0}}",
            ),
            "sample_rate 0",
        ),
        (json("{\"message_num\": 11, \"type\": \"spike\"}"), "DATA envelope with type 'spike'"),
        (two_frames, "2 frames, expected 3"),
        (
            {
                let mut x = [0.5f32; 10];
                x[3] = f32::NAN;
                data_message(13, "s", 0, 0, 1000.0, &x)
            },
            "sample 3 (sample_num 3) is not finite",
        ),
    ];
    for (i, (parts, want)) in cases.iter().enumerate() {
        let before = Counters::get(&counters.rejected);
        assert!(feed(&mut b, parts.clone()).is_empty());
        assert_eq!(Counters::get(&counters.rejected), before + 1, "case {i} ({want}) was not refused");
        let reason = next_rejection(&rx);
        assert!(reason.contains(want), "case {i}: '{reason}' does not say '{want}'");
    }
    // Refused messages whose header was read still count for message_num: 1, 3, 4, 6..=13
    // were seen; 2 and 5 (unreadable JSON) are lost.
    assert_eq!(b.stats().restarts, 0);
    assert_eq!(Counters::get(&counters.lost_messages), 2);
    // A good message still goes through afterwards.
    assert!(feed(&mut b, data_message(14, "s", 0, 0, 1000.0, &[0.5; 10])).is_empty());
    assert_eq!(b.stats().data_messages, 1);
    // The sample rate cannot change mid-run.
    assert!(feed(&mut b, data_message(15, "s", 1, 0, 2000.0, &[0.5; 10])).is_empty());
    assert!(next_rejection(&rx).contains("sample_rate 2000 Hz, but the run started at 1000 Hz"));
}

#[test]
fn channels_beyond_n_and_other_streams_are_ignored() {
    let mut set = settings(Mode::Continuous, 1, 10.0);
    set.stream = Some("probe-A".into());
    let (mut b, counters, _rx) = binner(set);
    feed(&mut b, data_message(1, "probe-A", 3, 0, 1000.0, &[0.5; 10]));
    feed(&mut b, data_message(2, "probe-B", 0, 0, 1000.0, &[0.5; 10]));
    feed(&mut b, data_message(3, "probe-A", 0, 0, 1000.0, &[0.5; 10]));
    assert_eq!(b.stats().ignored_channel, 1);
    assert_eq!(b.stats().ignored_stream, 1);
    assert_eq!(b.stats().data_messages, 1);
    assert_eq!(Counters::get(&counters.rejected), 0);
}

#[test]
fn a_jump_in_sample_numbers_skips_the_bins_in_between() {
    let (mut b, _, _rx) = binner(settings(Mode::Continuous, 2, 10.0));
    let mut f = Feeder { num: 0, block: 10, rate: 1000.0 };
    f.run(&mut b, &[0, 1], 0, 100, &[]);
    let bins = f.run(&mut b, &[0, 1], 100, 120, &[]);
    assert_eq!(bins.len(), 2);
    // Channel 0 delivers one bin more, then both jump a million samples ahead.
    f.run(&mut b, &[0], 120, 130, &[(0, 121)]);
    let bins = f.run(&mut b, &[0, 1], 1_000_100, 1_000_120, &[(1, 1_000_105)]);
    let seqs: Vec<u64> = bins.iter().map(|b| b.seq).collect();
    // Bin 2 (channel 0 only) is emitted when the jump comes; then the new bins.
    assert_eq!(seqs, [2, 100_000, 100_001]);
    assert_eq!(bins[0].counts, [1.0, 0.0]);
    assert_eq!(bins[1].counts, [0.0, 1.0]);
    assert_eq!(b.stats().binning.stale[1], 1);
}

#[test]
fn larger_blocks_grow_the_rings() {
    let (mut b, _, _rx) = binner(settings(Mode::Continuous, 1, 1.0)); // 1 sample per bin
    let mut f = Feeder { num: 0, block: 10, rate: 1000.0 };
    f.run(&mut b, &[0], 0, 100, &[]);
    let mut bins = f.run(&mut b, &[0], 100, 200, &[]);
    assert_eq!(b.stats().binning.grown, 0);
    f.block = 1000;
    bins.extend(f.run(&mut b, &[0], 200, 3200, &[(0, 250), (0, 3099)]));
    assert_eq!(b.stats().binning.grown, 1);
    assert_eq!(bins.len(), 3100);
    assert!(bins.iter().enumerate().all(|(k, b)| b.seq == k as u64));
    assert_eq!(bins.iter().map(|b| b.counts[0]).sum::<f32>(), 2.0);
    assert_eq!(bins[150].counts[0], 1.0);
    assert_eq!(bins[2999].counts[0], 1.0);
}

fn spike_settings(electrodes: &[&str]) -> Settings {
    let mut s = settings(Mode::Spikes, 2, 10.0);
    s.electrodes = electrodes.iter().map(|e| e.to_string()).collect();
    s
}

#[test]
fn spikes_are_counted_per_electrode_and_time_comes_from_any_message() {
    let (mut b, counters, _rx) = binner(spike_settings(&["TT2", "TT1"]));
    // Spikes before the first data message (no sample rate yet) are not counted.
    assert!(feed(&mut b, spike_message(1, "s", "TT1", 5, 4, 40)).is_empty());
    assert_eq!(b.stats().before_origin, 1);
    // The first data block sets the origin (1000) and time; samples are not examined.
    assert!(feed(&mut b, data_message(2, "s", 0, 1000, 1000.0, &[0.5; 10])).is_empty());
    assert_eq!(b.origin(), Some(1000));
    feed(&mut b, spike_message(3, "s", "TT1", 1003, 4, 40));
    feed(&mut b, spike_message(4, "s", "TT2", 1009, 4, 40));
    feed(&mut b, spike_message(5, "s", "TT2", 1012, 4, 40));
    feed(&mut b, spike_message(6, "s", "TT9", 1013, 4, 40)); // not in the list
                                                             // Bin 0 (1000..1010) is emitted once time reaches 1019 (one whole bin past its end).
    assert!(feed(&mut b, ttl_message(7, "s", 1018, 0, true)).is_empty());
    let bins = feed(&mut b, ttl_message(8, "s", 1019, 0, false));
    assert_eq!(bins.len(), 1);
    assert_eq!((bins[0].seq, bins[0].ts), (0, 1000));
    assert_eq!(bins[0].counts, [1.0, 1.0]);
    // A data block moves time by its last sample: bins 1..=3 (ends 1020, 1030, 1040).
    let bins = feed(&mut b, data_message(9, "s", 0, 1030, 1000.0, &[0.5; 20]));
    assert_eq!(
        bins.iter().map(|b| (b.seq, b.counts.clone())).collect::<Vec<_>>(),
        [(1, vec![1.0, 0.0]), (2, vec![0.0, 0.0]), (3, vec![0.0, 0.0])]
    );
    // A spike for a bin already emitted is late.
    feed(&mut b, spike_message(10, "s", "TT1", 1035, 4, 40));
    assert_eq!(b.stats().binning.late, 1);
    assert_eq!(b.stats().ignored_electrode, 1);
    assert_eq!(Counters::get(&counters.rejected), 0);
    // A waveform of the wrong size is refused.
    let mut m = spike_message(11, "s", "TT1", 1049, 4, 40);
    m[2].pop();
    feed(&mut b, m);
    assert_eq!(Counters::get(&counters.rejected), 1);
}

#[test]
fn electrodes_map_by_first_appearance_without_a_list() {
    let (mut b, _, _rx) = binner(spike_settings(&[]));
    feed(&mut b, data_message(1, "s", 0, 0, 1000.0, &[0.0; 10]));
    feed(&mut b, spike_message(2, "s", "Electrode 7", 1, 1, 40));
    feed(&mut b, spike_message(3, "s", "Electrode 2", 2, 1, 40));
    feed(&mut b, spike_message(4, "s", "Electrode 7", 3, 1, 40));
    feed(&mut b, spike_message(5, "s", "Electrode 3", 4, 1, 40)); // a third: beyond channels
    let bins = feed(&mut b, data_message(6, "s", 0, 10, 1000.0, &[0.0; 20]));
    assert_eq!(bins[0].counts, [2.0, 1.0]);
    assert_eq!(b.stats().ignored_electrode, 1);
}

#[test]
fn json_strings_with_escapes_are_read() {
    let mut set = settings(Mode::Continuous, 1, 10.0);
    set.stream = Some("Rhythm \"A\"".into());
    let (mut b, counters, _rx) = binner(set);
    feed(&mut b, data_message(1, "Rhythm \"A\"", 0, 0, 1000.0, &[0.5; 10]));
    assert_eq!(b.stats().data_messages, 1);
    assert_eq!(Counters::get(&counters.rejected), 0);
}

#[test]
fn a_dead_channel_does_not_hold_the_warm_up_forever() {
    let (mut b, _, _rx) = binner(settings(Mode::Continuous, 2, 10.0));
    let mut f = Feeder { num: 0, block: 10, rate: 1000.0 };
    // Only channel 0 delivers: after twice the warm-up (200 samples) binning starts, and
    // bins are emitted without channel 1.
    assert!(f.run(&mut b, &[0], 0, 200, &[]).is_empty());
    let bins = f.run(&mut b, &[0], 200, 300, &[]);
    assert_eq!(b.origin(), Some(200));
    assert!(!bins.is_empty() && bins[0].seq == 0);
    assert_eq!(b.stats().binning.stale[1], bins.len() as u64);
}

#[test]
fn settings_are_checked() {
    let cfg = |t: &str| -> OpenEphysConfig { toml::from_str(&format!("endpoint = \"tcp://x:1\"\n{t}")).unwrap() };
    assert!(Settings::new(&cfg(""), 4, 20.0).is_ok());
    assert!(Settings::new(&cfg("mode = \"lfp\""), 4, 20.0).unwrap_err().contains("mode"));
    assert!(Settings::new(&cfg("threshold = -4"), 4, 20.0).unwrap_err().contains("threshold"));
    assert!(Settings::new(&cfg("noise_seconds = 0"), 4, 20.0).unwrap_err().contains("noise_seconds"));
    let e = Settings::new(&cfg("mode = \"spikes\"\nelectrodes = [\"a\", \"b\"]"), 4, 20.0).unwrap_err();
    assert!(e.contains("2 electrodes"), "{e}");
    let e = Settings::new(&cfg("mode = \"spikes\"\nelectrodes = [\"a\", \"a\"]"), 2, 20.0).unwrap_err();
    assert!(e.contains("twice"), "{e}");
    assert!(Settings::new(&cfg("electrodes = [\"a\"]"), 1, 20.0).unwrap_err().contains("spikes"));
}
