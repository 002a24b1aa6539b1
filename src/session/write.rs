//! Writing a session folder. One writer, on one thread (the recorder's, or the main thread
//! while a calibration block is recorded before it starts): records are appended to chunk
//! buffers in memory, and each buffer becomes one framed chunk written with a single
//! `write` when it is full or when [`SessionWriter::flush_if_due`] finds it old. What was
//! written survives `kill -9` of the process (it is in the kernel's page cache); `fdatasync`
//! runs once a second and at the end, for a crash of the machine.

use super::*;
use crate::error::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A bins buffer this large is written at once.
const CHUNK_BYTES: usize = 1 << 20;
/// Buffered records are written at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// ...and synced to the disk at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);

pub struct SessionWriter {
    dir: PathBuf,
    file: File,
    /// Bins of `shape` not yet written (shape bytes first).
    bins: Vec<u8>,
    shape: Option<Shape>,
    events: String,
    /// Index of the next bin record.
    next_index: u64,
    /// Scratch of the compressed payload.
    packed: Vec<u8>,
    last_flush: Instant,
    last_sync: Instant,
    bytes_written: u64,
    chunks_written: u64,
}

/// What a finished writer reports.
#[derive(Clone, Debug, Default)]
pub struct Written {
    pub records: u64,
    pub chunks: u64,
    pub bytes: u64,
}

impl SessionWriter {
    /// Creates the session folder `dir` with its header and an empty record stream. An
    /// existing session there is not overwritten: it is moved aside to `dir` + `-<its
    /// creation time>` (the returned note says where), so no recording is ever lost.
    pub fn create(dir: &Path, header: &Header) -> Result<(SessionWriter, Option<String>)> {
        let note = if dir.exists() { Some(move_aside(dir)?) } else { None };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        write_header(dir, header)?;
        let path = dir.join(RECORDS_FILE);
        let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut head = [0u8; FILE_HEADER];
        head[..8].copy_from_slice(&MAGIC);
        head[8..12].copy_from_slice(&VERSION.to_le_bytes());
        file.write_all(&head).map_err(|e| Error::io(&path, e))?;
        let now = Instant::now();
        let w = SessionWriter {
            dir: dir.to_path_buf(),
            file,
            bins: Vec::with_capacity(CHUNK_BYTES + (1 << 16)),
            shape: None,
            events: String::new(),
            next_index: 0,
            packed: Vec::new(),
            last_flush: now,
            last_sync: now,
            bytes_written: FILE_HEADER as u64,
            chunks_written: 0,
        };
        Ok((w, note))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rewrites `session.json` (atomically: a new file renamed over the old), e.g. once the
    /// calibrated model is known.
    pub fn update_header(&self, header: &Header) -> Result<()> {
        write_header(&self.dir, header)
    }

    /// Stores a model file in the folder as `model-K.safetensors`; returns its name and
    /// SHA-256.
    pub fn add_model(&self, k: usize, bytes: &[u8]) -> Result<(String, String)> {
        let name = model_file_name(k);
        let path = self.dir.join(&name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        Ok((name, sha256_hex(bytes)))
    }

    /// Index the next bin record will get.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Appends a bin record (its `index` is set here) and returns its index.
    pub fn bin(&mut self, fields: &BinFields, shape: Shape, arrays: &BinArrays) -> std::io::Result<u64> {
        debug_assert_eq!(arrays.counts.len(), shape.channels);
        if self.shape != Some(shape) {
            self.flush_bins()?;
            self.shape = Some(shape);
        }
        if self.bins.is_empty() {
            self.bins.extend_from_slice(&(shape.channels as u32).to_le_bytes());
            self.bins.extend_from_slice(&(shape.behavior_dims as u16).to_le_bytes());
            self.bins.extend_from_slice(&(shape.latents as u16).to_le_bytes());
        }
        let index = self.next_index;
        BinFields { index, ..*fields }.encode(&mut self.bins);
        arrays.encode(&mut self.bins);
        self.next_index += 1;
        if self.bins.len() >= CHUNK_BYTES {
            self.flush_bins()?;
        }
        Ok(index)
    }

    /// Appends an event. `record` is set to the index of the next bin record (what the
    /// event happened before) unless the event names one itself.
    pub fn event(&mut self, mut event: serde_json::Value) {
        if let Some(o) = event.as_object_mut() {
            o.entry("record").or_insert(self.next_index.into());
        }
        self.events.push_str(&event.to_string());
        self.events.push('\n');
    }

    /// Writes what is buffered if the last write is older than [`FLUSH_EVERY`], and syncs
    /// once a second.
    pub fn flush_if_due(&mut self) -> std::io::Result<()> {
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.file.sync_data()?;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    /// Writes every buffered record and event (bins first: events name the records before
    /// which they happened, so a reader has them all by the end of the file either way).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.flush_bins()?;
        if !self.events.is_empty() {
            let events = std::mem::take(&mut self.events);
            self.chunk(ChunkKind::Events, events.as_bytes())?;
        }
        self.last_flush = Instant::now();
        Ok(())
    }

    fn flush_bins(&mut self) -> std::io::Result<()> {
        if self.bins.len() > SHAPE_BYTES {
            let bins = std::mem::take(&mut self.bins);
            self.chunk(ChunkKind::Bins, &bins)?;
            self.bins = bins;
        }
        self.bins.clear();
        Ok(())
    }

    /// One framed chunk, compressed, in one write.
    fn chunk(&mut self, kind: ChunkKind, raw: &[u8]) -> std::io::Result<()> {
        self.packed.clear();
        self.packed.resize(CHUNK_HEADER, 0);
        {
            let mut z = flate2::write::ZlibEncoder::new(&mut self.packed, flate2::Compression::fast());
            z.write_all(raw)?;
            z.finish()?;
        }
        let stored = self.packed.len() - CHUNK_HEADER;
        let crc = crc32fast::hash(&self.packed[CHUNK_HEADER..]);
        let h = &mut self.packed[..CHUNK_HEADER];
        h[..4].copy_from_slice(&CHUNK_MAGIC);
        h[4] = kind as u8;
        h[5] = ZLIB;
        h[8..12].copy_from_slice(&(stored as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let fcrc = frame_crc(h);
        h[20..24].copy_from_slice(&fcrc.to_le_bytes());
        self.file.write_all(&self.packed)?;
        self.bytes_written += self.packed.len() as u64;
        self.chunks_written += 1;
        Ok(())
    }

    /// The clean end: everything buffered, an end chunk with `summary`, synced.
    pub fn finish(mut self, summary: serde_json::Value) -> std::io::Result<Written> {
        self.flush()?;
        self.chunk(ChunkKind::End, summary.to_string().as_bytes())?;
        self.file.sync_all()?;
        Ok(Written { records: self.next_index, chunks: self.chunks_written, bytes: self.bytes_written })
    }
}

fn write_header(dir: &Path, header: &Header) -> Result<()> {
    let path = dir.join(HEADER_FILE);
    let tmp = dir.join(format!("{HEADER_FILE}.tmp"));
    let text = serde_json::to_string_pretty(header).expect("the header serialises");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// Moves an existing session folder aside, named by its creation time (or, without a
/// readable header, by the time of the move).
fn move_aside(dir: &Path) -> Result<String> {
    let stamp = std::fs::read_to_string(dir.join(HEADER_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["created"].as_str().map(str::to_string))
        .unwrap_or_else(now_utc);
    let stamp: String = stamp.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let name = dir.file_name().map_or("session".into(), |n| n.to_string_lossy().into_owned());
    let mut to = dir.with_file_name(format!("{name}-{stamp}"));
    let mut k = 1;
    while to.exists() {
        to = dir.with_file_name(format!("{name}-{stamp}-{k}"));
        k += 1;
    }
    std::fs::rename(dir, &to).map_err(|e| Error::io(dir, e))?;
    Ok(format!("the previous session in {} was moved to {}", dir.display(), to.display()))
}

/// The current UTC time as RFC 3339 with microseconds, without a date crate
/// (civil-from-days).
pub fn now_utc() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (secs, micros) = (now.as_secs(), now.subsec_micros());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
