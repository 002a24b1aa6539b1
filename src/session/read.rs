//! Reading a session folder. [`Session::open`] reads the header and scans `records.lls`
//! once, checking every frame: it keeps the events, the end summary and where each bins
//! chunk lies, and stops at the first damage (a cut-off chunk after `kill -9`, a flipped
//! byte), naming where. Bins are then read chunk by chunk ([`Session::bin_chunks`]), so an
//! hour-long session is never held in memory at once.

use super::*;
use crate::error::{Error, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Where a bins chunk lies in `records.lls`.
#[derive(Clone, Copy, Debug)]
struct ChunkAt {
    offset: u64,
    stored: usize,
    raw: usize,
    encoding: u8,
    crc: u32,
}

/// An opened session.
#[derive(Debug)]
pub struct Session {
    pub dir: PathBuf,
    pub header: Header,
    /// Every event, in the order written.
    pub events: Vec<serde_json::Value>,
    /// The end chunk's summary: present when the run ended cleanly.
    pub end: Option<serde_json::Value>,
    /// Bin records readable (up to any damage).
    pub bins: u64,
    /// What stopped the scan before the end of the file, if anything.
    pub damage: Option<String>,
    chunks: Vec<ChunkAt>,
}

/// One bin record read back.
#[derive(Clone, Debug, PartialEq)]
pub struct BinRecord {
    pub fields: BinFields,
    pub shape: Shape,
    /// counts, behaviour in, behaviour out, latent, lag-1 latent, in file order.
    values: Vec<f32>,
}

impl BinRecord {
    pub fn arrays(&self) -> BinArrays<'_> {
        let s = self.shape;
        let (c, rest) = self.values.split_at(s.channels);
        let (bi, rest) = rest.split_at(s.behavior_dims);
        let (bo, rest) = rest.split_at(s.behavior_dims);
        let (lat, lag1) = rest.split_at(s.latents);
        BinArrays { counts: c, behavior_in: bi, behavior_out: bo, latent: lat, lag1 }
    }
    pub fn decision(&self) -> Option<Decision> {
        Decision::from_code(self.fields.decision)
    }
}

fn bad(dir: &Path, msg: impl Into<String>) -> Error {
    Error::Data { path: dir.to_path_buf(), msg: msg.into() }
}

impl Session {
    /// Opens a session folder. Errors (nothing readable, a newer format) are refusals; damage
    /// after readable records is not an error: [`Session::damage`] says what stopped the
    /// reading, and [`Session::status`] says it in a sentence.
    pub fn open(dir: impl AsRef<Path>) -> Result<Session> {
        let dir = dir.as_ref();
        let hpath = dir.join(HEADER_FILE);
        let text = std::fs::read_to_string(&hpath)
            .map_err(|e| bad(dir, format!("not a session folder: cannot read {HEADER_FILE} ({e})")))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&hpath, format!("not valid JSON: {e}")))?;
        if raw["format"] != FORMAT_NAME {
            return Err(bad(&hpath, format!("not a latentloop session header (format {})", raw["format"])));
        }
        match raw["version"].as_u64() {
            Some(v) if v > VERSION as u64 => {
                return Err(bad(
                    dir,
                    format!(
                    "session format version {v} is newer than this latentloop reads ({VERSION}); upgrade latentloop"
                ),
                ))
            }
            Some(_) => {}
            None => return Err(bad(&hpath, "no format version")),
        }
        let header: Header = serde_json::from_value(raw).map_err(|e| bad(&hpath, format!("bad header: {e}")))?;
        let mut s = Session {
            dir: dir.to_path_buf(),
            header,
            events: Vec::new(),
            end: None,
            bins: 0,
            damage: None,
            chunks: Vec::new(),
        };
        s.scan()?;
        Ok(s)
    }

    /// Whether the run ended cleanly and nothing is damaged.
    pub fn clean(&self) -> bool {
        self.end.is_some() && !self.aborted() && self.damage.is_none()
    }

    /// The run closed its recording after an error stopped it.
    pub fn aborted(&self) -> bool {
        self.end.as_ref().is_some_and(|e| e["aborted"] == true)
    }

    /// One sentence for people: how many bins were read and whether the session ended
    /// cleanly.
    pub fn status(&self) -> String {
        match (&self.damage, &self.end) {
            (None, Some(_)) if self.aborted() => {
                format!("{} bins; the run was stopped by an error (its recording was closed)", self.bins)
            }
            (None, Some(_)) => format!("{} bins; the session ended cleanly", self.bins),
            (None, None) => format!("recovered {} bins; the session did not end cleanly (no end record)", self.bins),
            (Some(d), _) => format!("recovered {} bins; the session did not end cleanly: {d}", self.bins),
        }
    }

    pub fn path_of(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn scan(&mut self) -> Result<()> {
        let path = self.dir.join(RECORDS_FILE);
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut head = [0u8; FILE_HEADER];
        if len < FILE_HEADER as u64 {
            self.damage = Some(format!("{RECORDS_FILE} is {len} bytes, shorter than its {FILE_HEADER}-byte header"));
            return Ok(());
        }
        f.read_exact(&mut head).map_err(|e| Error::io(&path, e))?;
        if head[..8] != MAGIC {
            return Err(bad(&path, "not a latentloop record stream (bad magic)"));
        }
        let v = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if v > VERSION {
            return Err(bad(
                &path,
                format!(
                    "session format version {v} is newer than this latentloop reads ({VERSION}); upgrade latentloop"
                ),
            ));
        }
        let mut at = FILE_HEADER as u64;
        let mut n = 0usize;
        let mut buf = Vec::new();
        while at < len {
            let where_ = |what: &str| format!("chunk {n} at byte {at} of {RECORDS_FILE}: {what}");
            if len - at < CHUNK_HEADER as u64 {
                self.damage =
                    Some(where_(&format!("cut off inside its header ({} of {CHUNK_HEADER} bytes)", len - at)));
                break;
            }
            let mut h = [0u8; CHUNK_HEADER];
            f.read_exact(&mut h).map_err(|e| Error::io(&path, e))?;
            let word = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
            if h[..4] != CHUNK_MAGIC || frame_crc(&h) != word(20) {
                self.damage = Some(where_("its frame is damaged (bad magic or frame checksum)"));
                break;
            }
            let (stored, raw, crc) = (word(8) as usize, word(12) as usize, word(16));
            let body = at + CHUNK_HEADER as u64;
            if len - body < stored as u64 {
                self.damage = Some(where_(&format!("cut off ({} of {stored} payload bytes)", len - body)));
                break;
            }
            let c = ChunkAt { offset: body, stored, raw, encoding: h[5], crc };
            match ChunkKind::from_code(h[4]) {
                Some(ChunkKind::Bins) => match read_payload(&mut f, &c, &mut buf) {
                    Ok(()) if buf.len() >= SHAPE_BYTES => {
                        let shape = shape_of(&buf);
                        let body = buf.len() - SHAPE_BYTES;
                        if !body.is_multiple_of(shape.record_len()) {
                            self.damage = Some(where_("its records do not fill it (damaged)"));
                            break;
                        }
                        self.bins += (body / shape.record_len()) as u64;
                        self.chunks.push(c);
                    }
                    Ok(()) => {
                        self.damage = Some(where_("a bins chunk without its shape"));
                        break;
                    }
                    Err(why) => {
                        self.damage = Some(where_(&why));
                        break;
                    }
                },
                Some(kind @ (ChunkKind::Events | ChunkKind::End)) => {
                    if let Err(why) = read_payload(&mut f, &c, &mut buf) {
                        self.damage = Some(where_(&why));
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf);
                    if kind == ChunkKind::End {
                        self.end = serde_json::from_str(&text).ok();
                    } else {
                        self.events.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
                    }
                }
                // A kind from a newer writer: checked, then skipped.
                None => {
                    if let Err(why) = read_payload(&mut f, &c, &mut buf) {
                        self.damage = Some(where_(&why));
                        break;
                    }
                }
            }
            at = body + stored as u64;
            f.seek(SeekFrom::Start(at)).map_err(|e| Error::io(&path, e))?;
            n += 1;
        }
        Ok(())
    }

    /// The bin records chunk by chunk, in the order written (up to any damage).
    pub fn bin_chunks(&self) -> impl Iterator<Item = Result<Vec<BinRecord>>> + '_ {
        let path = self.dir.join(RECORDS_FILE);
        let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e));
        let mut buf = Vec::new();
        self.chunks.iter().map(move |c| {
            let f = file.as_mut().map_err(|e| bad(&path, e.to_string()))?;
            read_payload(f, c, &mut buf).map_err(|why| bad(&path, why))?;
            Ok(records_of(&buf))
        })
    }

    /// Every bin record (for small sessions and tests; [`Session::bin_chunks`] streams).
    pub fn all_bins(&self) -> Result<Vec<BinRecord>> {
        let mut all = Vec::with_capacity(self.bins as usize);
        for c in self.bin_chunks() {
            all.extend(c?);
        }
        Ok(all)
    }

    /// The events of one kind.
    pub fn events_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
        self.events.iter().filter(move |e| e["kind"] == kind)
    }
}

fn shape_of(b: &[u8]) -> Shape {
    Shape {
        channels: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) as usize,
        behavior_dims: u16::from_le_bytes([b[4], b[5]]) as usize,
        latents: u16::from_le_bytes([b[6], b[7]]) as usize,
    }
}

fn records_of(buf: &[u8]) -> Vec<BinRecord> {
    let shape = shape_of(buf);
    buf[SHAPE_BYTES..]
        .chunks_exact(shape.record_len())
        .map(|r| BinRecord {
            fields: BinFields::decode(r),
            shape,
            values: r[BIN_FIXED..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        })
        .collect()
}

/// Reads, checks and decompresses one chunk's payload into `out`.
fn read_payload(f: &mut std::fs::File, c: &ChunkAt, out: &mut Vec<u8>) -> std::result::Result<(), String> {
    let mut stored = vec![0u8; c.stored];
    f.seek(SeekFrom::Start(c.offset))
        .and_then(|_| f.read_exact(&mut stored))
        .map_err(|e| format!("cannot read: {e}"))?;
    if crc32fast::hash(&stored) != c.crc {
        return Err("its payload is damaged (checksum mismatch)".into());
    }
    out.clear();
    match c.encoding {
        RAW => out.extend_from_slice(&stored),
        ZLIB => {
            flate2::read::ZlibDecoder::new(&stored[..])
                .read_to_end(out)
                .map_err(|e| format!("cannot decompress its payload: {e}"))?;
        }
        e => return Err(format!("unknown payload encoding {e}")),
    }
    if out.len() != c.raw {
        return Err(format!("decompressed to {} bytes, the frame says {}", out.len(), c.raw));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::write::SessionWriter;

    fn header() -> Header {
        Header {
            format: FORMAT_NAME.into(),
            version: VERSION,
            latentloop_version: "test".into(),
            git_commit: "unknown".into(),
            created: "2026-12-03T00:00:00Z".into(),
            created_monotonic_ns: 5,
            clock: "test".into(),
            config_path: "x.toml".into(),
            config_text: String::new(),
            source: "zmq".into(),
            bin_ms: 1.0,
            channels: 3,
            behavior_dims: 1,
            model: None,
            decoder: DecoderRef {
                seed: 1,
                samples: None,
                kalman_mode: "exact".into(),
                backend: "cpu".into(),
                max_predict_gap: 50,
            },
            description: "test".into(),
            subject: None,
            metadata: serde_json::Value::Null,
        }
    }

    /// A session of `chunks` bins chunks of 40 records each (shape 3/1/2, then 3/1/4 for the
    /// last), events between them; `end` writes the end chunk.
    fn write(dir: &Path, chunks: usize, end: bool) {
        let (mut w, _) = SessionWriter::create(dir, &header()).unwrap();
        for c in 0..chunks {
            let latents = if c + 1 == chunks { 4 } else { 2 };
            let shape = Shape { channels: 3, behavior_dims: 1, latents };
            for k in 0..40u64 {
                let seq = c as u64 * 40 + k;
                let f = BinFields { seq, recv_ns: 10 * seq, kl: seq as f32 / 8.0, decision: 0, ..Default::default() };
                let counts = [seq as f32, 1.0, 2.0];
                let lat: Vec<f32> = (0..latents).map(|i| i as f32 + 0.5).collect();
                let a = BinArrays {
                    counts: &counts,
                    behavior_in: &[0.25],
                    behavior_out: &[-1.0],
                    latent: &lat,
                    lag1: &lat,
                };
                w.bin(&f, shape, &a).unwrap();
            }
            w.event(serde_json::json!({"kind": "test", "chunk": c}));
            w.flush().unwrap();
        }
        if end {
            w.finish(serde_json::json!({"kind": "end"})).unwrap();
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ll-session-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn what_was_written_reads_back() {
        let dir = tmp("roundtrip");
        write(&dir, 3, true);
        let s = Session::open(&dir).unwrap();
        assert!(s.clean(), "{}", s.status());
        assert_eq!((s.bins, s.events_of("test").count()), (120, 3));
        let bins = s.all_bins().unwrap();
        for (k, b) in bins.iter().enumerate() {
            assert_eq!((b.fields.index, b.fields.seq, b.fields.recv_ns), (k as u64, k as u64, 10 * k as u64));
            assert_eq!(b.fields.kl, k as f32 / 8.0);
            let a = b.arrays();
            assert_eq!(
                (a.counts, a.behavior_in, a.behavior_out),
                (&[k as f32, 1.0, 2.0][..], &[0.25][..], &[-1.0][..])
            );
            assert_eq!(a.latent.len(), if k >= 80 { 4 } else { 2 });
        }
        // Events name the record they came before.
        assert_eq!(s.events_of("test").map(|e| e["record"].as_u64().unwrap()).collect::<Vec<_>>(), [40, 80, 120]);
        assert_eq!(Session::open(&dir).unwrap().header, header());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cut_or_damaged_stream_is_read_up_to_the_damage_and_says_where() {
        let dir = tmp("damage");
        write(&dir, 3, true);
        let path = dir.join(RECORDS_FILE);
        let full = std::fs::read(&path).unwrap();
        let chunk_starts: Vec<usize> = {
            let mut v = Vec::new();
            let mut at = FILE_HEADER;
            while at < full.len() {
                v.push(at);
                at += CHUNK_HEADER + u32::from_le_bytes(full[at + 8..at + 12].try_into().unwrap()) as usize;
            }
            v
        };
        // Chunks: bins, events, bins, events, bins, events, end.
        assert_eq!(chunk_starts.len(), 7);

        // Cut inside the third bins chunk's payload (as kill -9 mid-write would).
        std::fs::write(&path, &full[..chunk_starts[4] + 30]).unwrap();
        let s = Session::open(&dir).unwrap();
        assert_eq!(s.bins, 80);
        assert!(!s.clean());
        let st = s.status();
        assert!(st.contains("recovered 80 bins") && st.contains("did not end cleanly"), "{st}");
        assert!(st.contains(&format!("chunk 4 at byte {}", chunk_starts[4])) && st.contains("cut off"), "{st}");

        // Cut inside a frame.
        std::fs::write(&path, &full[..chunk_starts[2] + 10]).unwrap();
        let s = Session::open(&dir).unwrap();
        assert_eq!(s.bins, 40);
        assert!(s.status().contains("cut off inside its header"), "{}", s.status());

        // A flipped byte in the second bins chunk's payload; and in a frame.
        let mut bad = full.clone();
        bad[chunk_starts[2] + CHUNK_HEADER + 5] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let s = Session::open(&dir).unwrap();
        assert_eq!(s.bins, 40);
        assert!(s.status().contains("chunk 2") && s.status().contains("payload is damaged"), "{}", s.status());
        let mut bad = full.clone();
        bad[chunk_starts[1] + 9] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let s = Session::open(&dir).unwrap();
        assert!(s.status().contains("chunk 1") && s.status().contains("frame is damaged"), "{}", s.status());
        assert_eq!(s.bins, 40);
        // Streaming the bins stops where the scan stopped.
        assert_eq!(s.all_bins().unwrap().len(), 40);

        // No end chunk: read in full, not clean.
        std::fs::write(&path, &full[..*chunk_starts.last().unwrap()]).unwrap();
        let s = Session::open(&dir).unwrap();
        assert_eq!((s.bins, s.damage.is_none(), s.clean()), (120, true, false));
        assert!(s.status().contains("no end record"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn newer_formats_and_other_folders_are_refused_by_name() {
        let dir = tmp("version");
        write(&dir, 1, true);
        let path = dir.join(RECORDS_FILE);
        let mut b = std::fs::read(&path).unwrap();
        b[8] = 2;
        std::fs::write(&path, &b).unwrap();
        let e = Session::open(&dir).unwrap_err().to_string();
        assert!(e.contains("session format version 2 is newer than this latentloop reads (1)"), "{e}");
        let h = dir.join(HEADER_FILE);
        let text = std::fs::read_to_string(&h).unwrap().replace("\"version\": 1", "\"version\": 7");
        std::fs::write(&h, text).unwrap();
        let e = Session::open(&dir).unwrap_err().to_string();
        assert!(e.contains("session format version 7 is newer"), "{e}");
        let e = Session::open(dir.join("nope")).unwrap_err().to_string();
        assert!(e.contains("not a session folder"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_existing_session_is_moved_aside_not_overwritten() {
        let dir = tmp("aside");
        write(&dir, 1, true);
        let (_w, note) = SessionWriter::create(&dir, &header()).unwrap();
        let note = note.expect("a note");
        let moved = dir.with_file_name(format!("{}-2026-12-03T00-00-00Z", dir.file_name().unwrap().to_string_lossy()));
        assert!(note.contains(&moved.display().to_string()), "{note}");
        assert_eq!(Session::open(&moved).unwrap().bins, 40);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&moved);
    }
}
