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
            Some(v) if v > VERSION as u64 => return Err(bad(
                dir,
                format!(
                    "session format version {v} is newer than this latentloop reads ({VERSION}); upgrade latentloop"
                ),
            )),
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
                // A kind from a newer writer: skipped.
                None => {}
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
