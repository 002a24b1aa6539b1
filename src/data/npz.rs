//! NumPy `.npz` files: a zip of `.npy` members, as written by `np.savez` (stored) and
//! `np.savez_compressed` (deflate).
//!
//! The `.npy` header is a Python dict literal, so this module carries a small literal parser
//! instead of depending on a Python runtime. Reading is strict about what would silently
//! corrupt a session (byte order, object arrays, truncation, shapes that disagree) and
//! lenient about what does not matter (extra arrays the dataset does not use, extra header
//! keys). Every failure is an [`Error::Data`] naming the file and the array.

use super::{Array2, Dataset};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

/// Element types latentloop reads (all little-endian or byte-order free).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    I1,
    U1,
    I2,
    U2,
    I4,
    U4,
    I8,
    U8,
    F2,
    F4,
    F8,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::I1 | Dtype::U1 => 1,
            Dtype::I2 | Dtype::U2 | Dtype::F2 => 2,
            Dtype::I4 | Dtype::U4 | Dtype::F4 => 4,
            Dtype::I8 | Dtype::U8 | Dtype::F8 => 8,
        }
    }

    /// The `.npy` descr string numpy writes for this type.
    pub fn descr(self) -> &'static str {
        match self {
            Dtype::Bool => "|b1",
            Dtype::I1 => "|i1",
            Dtype::U1 => "|u1",
            Dtype::I2 => "<i2",
            Dtype::U2 => "<u2",
            Dtype::I4 => "<i4",
            Dtype::U4 => "<u4",
            Dtype::I8 => "<i8",
            Dtype::U8 => "<u8",
            Dtype::F2 => "<f2",
            Dtype::F4 => "<f4",
            Dtype::F8 => "<f8",
        }
    }

    /// Parses a descr such as `'<f8'` or `'|u1'`; the error names the dtype.
    fn parse(descr: &str) -> std::result::Result<Dtype, String> {
        let (order, rest) = match descr.chars().next() {
            Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
            _ => ('|', descr),
        };
        let kind = rest.chars().next().unwrap_or(' ');
        if kind == 'O' {
            return Err(format!("object arrays (dtype '{descr}') are not supported: they hold pickled Python objects"));
        }
        let unsupported = || {
            format!(
                "unsupported dtype '{descr}' (latentloop reads bool, int8-64, uint8-64 and float16/32/64, little-endian)"
            )
        };
        let size: usize = rest.get(1..).and_then(|s| s.parse().ok()).ok_or_else(unsupported)?;
        let dtype = match (kind, size) {
            ('b', 1) => Dtype::Bool,
            ('i', 1) => Dtype::I1,
            ('u', 1) => Dtype::U1,
            ('i', 2) => Dtype::I2,
            ('u', 2) => Dtype::U2,
            ('i', 4) => Dtype::I4,
            ('u', 4) => Dtype::U4,
            ('i', 8) => Dtype::I8,
            ('u', 8) => Dtype::U8,
            ('f', 2) => Dtype::F2,
            ('f', 4) => Dtype::F4,
            ('f', 8) => Dtype::F8,
            _ => return Err(unsupported()),
        };
        // Byte order only matters for multi-byte types; numpy never writes '=' to a file, and a
        // file cannot tell whose "native" it meant.
        match order {
            '>' if size > 1 => {
                Err(format!("big-endian dtype '{descr}' is not supported; save it with arr.astype('<{kind}{size}')"))
            }
            '=' if size > 1 => Err(format!("dtype '{descr}' has native byte order, which a file cannot specify")),
            '|' if size > 1 => Err(format!("dtype '{descr}' has no byte order")),
            _ => Ok(dtype),
        }
    }
}

/// One array as read: C-order (row-major) values whatever the file's order.
///
/// Values are widened to f64, which is exact for every supported type except 64-bit
/// integers beyond 2^53, far outside any count, index or measurement a session holds.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    /// The dtype the file stored (or, when writing, the dtype to store).
    pub dtype: Dtype,
    pub data: Vec<f64>,
}

impl NpyArray {
    pub fn new(shape: Vec<usize>, dtype: Dtype, data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "array shape and data length differ");
        NpyArray { shape, dtype, data }
    }
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Every `.npy` member of an `.npz`, keyed by name without the `.npy` suffix (as `np.load`
/// shows them). Members that are not `.npy` files are skipped.
pub fn read_arrays(path: impl AsRef<Path>) -> Result<BTreeMap<String, NpyArray>> {
    let path = path.as_ref();
    let mut archive = open(path)?;
    let mut out = BTreeMap::new();
    for (key, index) in members(&archive) {
        let raw = read_member(&mut archive, index, &key).map_err(|m| Error::data(path, m))?;
        let data = raw.decode(|v| v);
        out.insert(key, NpyArray { shape: raw.header.shape, dtype: raw.header.dtype, data });
    }
    Ok(out)
}

/// Writes arrays as an uncompressed `.npz` (each in its own dtype), atomically.
pub fn write_arrays(path: impl AsRef<Path>, arrays: &[(&str, &NpyArray)]) -> Result<()> {
    let members: Vec<Member> = arrays
        .iter()
        .map(|(name, a)| Member { name, dtype: a.dtype, shape: a.shape.clone(), values: Values::F64(&a.data) })
        .collect();
    write_members(path.as_ref(), &members)
}

impl Dataset {
    /// Reads a session. Arrays other than the dataset's own are ignored.
    pub fn read_npz(path: impl AsRef<Path>) -> Result<Dataset> {
        let path = path.as_ref();
        let mut archive = open(path)?;
        let index: BTreeMap<String, usize> = members(&archive).into_iter().collect();
        let mut take = |key: &str| -> Result<Option<Raw>> {
            match index.get(key) {
                Some(&i) => read_member(&mut archive, i, key).map(Some).map_err(|m| Error::data(path, m)),
                None => Ok(None),
            }
        };
        let spikes = take("spikes")?;
        let dt = take("dt")?;
        let behavior = take("behavior")?;
        let latents = take("latents")?;
        let rates = take("rates")?;
        let trial_starts = take("trial_starts")?;
        assemble(spikes, dt, behavior, latents, rates, trial_starts, &index).map_err(|m| Error::data(path, m))
    }

    /// Writes the session as an uncompressed `.npz` that `np.load` reads; atomically, so a
    /// reader never sees half a file.
    pub fn write_npz(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let s = &self.spikes;
        // Integral counts as int32 keep the file small and say "counts" to a Python reader;
        // anything else (smoothed or scaled data) must not be rounded.
        let integral = s.data.iter().all(|&v| v.fract() == 0.0 && v.abs() < 2_147_483_648.0);
        let spikes_dtype = if integral { Dtype::I4 } else { Dtype::F4 };
        // dt is stored as the f64 nearest to the f32's shortest decimal form (0.02, not
        // 0.0199999995529651...), which still reads back to the identical f32.
        let dt = [self.dt.to_string().parse::<f64>().unwrap_or(self.dt as f64)];
        let starts: Vec<f64> = self.trial_starts.iter().flatten().map(|&s| s as f64).collect();
        let mut members = vec![Member::matrix("spikes", spikes_dtype, s)];
        for (name, arr) in [("behavior", &self.behavior), ("latents", &self.latents), ("rates", &self.rates)] {
            if let Some(arr) = arr {
                members.push(Member::matrix(name, Dtype::F4, arr));
            }
        }
        members.push(Member { name: "dt", dtype: Dtype::F8, shape: vec![], values: Values::F64(&dt) });
        if self.trial_starts.is_some() {
            members.push(Member {
                name: "trial_starts",
                dtype: Dtype::I8,
                shape: vec![starts.len()],
                values: Values::F64(&starts),
            });
        }
        write_members(path, &members)
    }
}

// ---------------------------------------------------------------------------------------
// Reading

type Archive = ZipArchive<BufReader<File>>;

fn open(path: &Path) -> Result<Archive> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 6];
    let n = read_up_to(&mut file, &mut magic).map_err(|e| Error::io(path, e))?;
    if magic[..n] == b"\x93NUMPY"[..n] && n == 6 {
        return Err(Error::data(path, "this is a single-array .npy file; a session is an .npz (np.savez)"));
    }
    file.rewind().map_err(|e| Error::io(path, e))?;
    ZipArchive::new(BufReader::new(file))
        .map_err(|e| Error::data(path, format!("not a readable .npz (zip) archive, truncated or corrupt: {e}")))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// (key, member index) of every `.npy` member.
fn members(archive: &Archive) -> Vec<(String, usize)> {
    (0..archive.len())
        .filter_map(|i| {
            let name = archive.name_for_index(i)?.ok()?;
            name.strip_suffix(".npy").map(|k| (k.to_string(), i))
        })
        .collect()
}

#[derive(Debug)]
struct Header {
    dtype: Dtype,
    fortran: bool,
    shape: Vec<usize>,
}

impl Header {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Raw {
    header: Header,
    bytes: Vec<u8>,
}

/// Headers beyond this are not numpy's (it pads to 64 bytes, and a header only grows with
/// the number of dimensions); refusing them keeps a corrupt length from allocating.
const MAX_HEADER: usize = 1 << 20;

fn read_member(archive: &mut Archive, index: usize, key: &str) -> std::result::Result<Raw, String> {
    let mut member = archive.by_index(index).map_err(|e| format!("array '{key}' cannot be opened: {e}"))?;
    let corrupt = |e: io::Error| format!("array '{key}' cannot be read (truncated or corrupt archive?): {e}");
    let mut pre = [0u8; 10];
    let n = read_up_to(&mut member, &mut pre).map_err(corrupt)?;
    if n < 10 || &pre[..6] != b"\x93NUMPY" {
        return Err(format!("array '{key}' is not a .npy array (no NUMPY magic)"));
    }
    let (major, minor) = (pre[6], pre[7]);
    let (len, utf8) = match major {
        1 => (u16::from_le_bytes([pre[8], pre[9]]) as usize, false),
        2 | 3 => {
            let mut more = [0u8; 2];
            if read_up_to(&mut member, &mut more).map_err(corrupt)? < 2 {
                return Err(format!("array '{key}': truncated .npy header"));
            }
            (u32::from_le_bytes([pre[8], pre[9], more[0], more[1]]) as usize, major == 3)
        }
        _ => return Err(format!("array '{key}': unsupported .npy format version {major}.{minor}")),
    };
    if len > MAX_HEADER {
        return Err(format!("array '{key}': .npy header length {len} is implausible (corrupt file?)"));
    }
    let mut text = vec![0u8; len];
    if read_up_to(&mut member, &mut text).map_err(corrupt)? < len {
        return Err(format!("array '{key}': truncated .npy header"));
    }
    // Versions 1 and 2 are latin-1, 3 is UTF-8 (for structured field names).
    let text: String = if utf8 {
        String::from_utf8(text).map_err(|_| format!("array '{key}': .npy header is not UTF-8"))?
    } else {
        text.iter().map(|&b| b as char).collect()
    };
    let header = parse_header(&text).map_err(|m| format!("array '{key}': {m}"))?;
    let nbytes = header
        .shape
        .iter()
        .try_fold(header.dtype.size(), |acc, &d| acc.checked_mul(d))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| format!("array '{key}': shape {:?} is too large", header.shape))?;
    // The header and the zip directory both come from the file: pre-allocate no more than
    // they agree on, capped, so lying sizes cannot allocate terabytes before the data runs
    // out (a real large array just grows the buffer a few times).
    let mut bytes = Vec::with_capacity(nbytes.min(member.size() as usize).min(1 << 28));
    (&mut member).take(nbytes as u64).read_to_end(&mut bytes).map_err(corrupt)?;
    if bytes.len() < nbytes {
        return Err(format!(
            "array '{key}' is truncated: its header promises {nbytes} bytes of data, the file holds {}",
            bytes.len()
        ));
    }
    // Read to the end of the member so the zip reader verifies its CRC (numpy ignores
    // trailing bytes, so do we; the cap bounds the work a hostile member can cause).
    io::copy(&mut (&mut member).take(1 << 20), &mut io::sink()).map_err(corrupt)?;
    Ok(Raw { header, bytes })
}

impl Raw {
    /// The values in C order, converted with `conv`.
    fn decode<T: Copy + Default>(&self, conv: impl Fn(f64) -> T) -> Vec<T> {
        let b = &self.bytes;
        let mut flat: Vec<T> = Vec::with_capacity(self.header.len());
        macro_rules! each {
            ($n:literal, $f:expr) => {
                flat.extend(b.chunks_exact($n).map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    conv($f(a))
                }))
            };
        }
        match self.header.dtype {
            Dtype::Bool => each!(1, |a: [u8; 1]| (a[0] != 0) as u8 as f64),
            Dtype::I1 => each!(1, |a: [u8; 1]| a[0] as i8 as f64),
            Dtype::U1 => each!(1, |a: [u8; 1]| a[0] as f64),
            Dtype::I2 => each!(2, |a| i16::from_le_bytes(a) as f64),
            Dtype::U2 => each!(2, |a| u16::from_le_bytes(a) as f64),
            Dtype::F2 => each!(2, |a| f16_to_f64(u16::from_le_bytes(a))),
            Dtype::I4 => each!(4, |a| i32::from_le_bytes(a) as f64),
            Dtype::U4 => each!(4, |a| u32::from_le_bytes(a) as f64),
            Dtype::F4 => each!(4, |a| f32::from_le_bytes(a) as f64),
            Dtype::I8 => each!(8, |a| i64::from_le_bytes(a) as f64),
            Dtype::U8 => each!(8, |a| u64::from_le_bytes(a) as f64),
            Dtype::F8 => each!(8, f64::from_le_bytes),
        }
        if self.header.fortran && self.header.shape.len() > 1 {
            fortran_to_c(&flat, &self.header.shape)
        } else {
            flat
        }
    }
}

/// Reorders column-major data into row-major: walks the source in its own (first index
/// fastest) order and scatters each value to its C-order offset.
fn fortran_to_c<T: Copy + Default>(src: &[T], shape: &[usize]) -> Vec<T> {
    let mut dst = vec![T::default(); src.len()];
    if src.is_empty() {
        return dst;
    }
    let nd = shape.len();
    let mut c_stride = vec![1usize; nd];
    for d in (0..nd - 1).rev() {
        c_stride[d] = c_stride[d + 1] * shape[d + 1];
    }
    let mut idx = vec![0usize; nd];
    let mut off = 0usize;
    for &v in src {
        dst[off] = v;
        for d in 0..nd {
            idx[d] += 1;
            off += c_stride[d];
            if idx[d] < shape[d] {
                break;
            }
            off -= c_stride[d] * shape[d];
            idx[d] = 0;
        }
    }
    dst
}

/// IEEE binary16 to f64 (exact).
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

// ---------------------------------------------------------------------------------------
// The .npy header: a Python dict literal, e.g. {'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }

#[derive(Debug, PartialEq)]
enum Lit {
    Str(String),
    Int(i128),
    Bool(bool),
    None,
    Seq(Vec<Lit>),
    Dict(Vec<(Lit, Lit)>),
}

struct LitParser<'a> {
    s: &'a [char],
    i: usize,
}

impl LitParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<char> {
        self.ws();
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn value(&mut self, depth: usize) -> std::result::Result<Lit, String> {
        if depth > 32 {
            return Err("header nests too deeply".into());
        }
        match self.peek() {
            Some(q @ ('\'' | '"')) => {
                self.i += 1;
                let mut out = String::new();
                loop {
                    let c = *self.s.get(self.i).ok_or("unterminated string in header")?;
                    self.i += 1;
                    match c {
                        '\\' => {
                            let e = *self.s.get(self.i).ok_or("unterminated string in header")?;
                            self.i += 1;
                            out.push(e);
                        }
                        c if c == q => return Ok(Lit::Str(out)),
                        c => out.push(c),
                    }
                }
            }
            Some(open @ ('(' | '[')) => {
                self.i += 1;
                let close = if open == '(' { ')' } else { ']' };
                let mut items = Vec::new();
                while !self.eat(close) {
                    items.push(self.value(depth + 1)?);
                    if !self.eat(',') && self.peek() != Some(close) {
                        return Err(format!("expected ',' or '{close}' in header"));
                    }
                }
                Ok(Lit::Seq(items))
            }
            Some('{') => {
                self.i += 1;
                let mut items = Vec::new();
                while !self.eat('}') {
                    let k = self.value(depth + 1)?;
                    if !self.eat(':') {
                        return Err("expected ':' in header dict".into());
                    }
                    let v = self.value(depth + 1)?;
                    items.push((k, v));
                    if !self.eat(',') && self.peek() != Some('}') {
                        return Err("expected ',' or '}' in header dict".into());
                    }
                }
                Ok(Lit::Dict(items))
            }
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => {
                let start = self.i;
                self.i += 1;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let text: String = self.s[start..self.i].iter().collect();
                // Python 2 wrote long integers with an L suffix.
                if matches!(self.s.get(self.i), Some('L' | 'l')) {
                    self.i += 1;
                }
                text.parse().map(Lit::Int).map_err(|_| format!("bad integer '{text}' in header"))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
                    self.i += 1;
                }
                let word: String = self.s[start..self.i].iter().collect();
                match word.as_str() {
                    "True" => Ok(Lit::Bool(true)),
                    "False" => Ok(Lit::Bool(false)),
                    "None" => Ok(Lit::None),
                    _ => Err(format!("unexpected '{word}' in header")),
                }
            }
            Some(c) => Err(format!("unexpected '{c}' in header")),
            None => Err("header ends early".into()),
        }
    }
}

fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut p = LitParser { s: &chars, i: 0 };
    let Lit::Dict(items) = p.value(0)? else {
        return Err("the .npy header is not a dict".into());
    };
    let get = |key: &str| items.iter().find(|(k, _)| *k == Lit::Str(key.into())).map(|(_, v)| v);
    let dtype = match get("descr") {
        Some(Lit::Str(d)) => Dtype::parse(d)?,
        Some(Lit::Seq(_)) => return Err("structured (record) dtypes are not supported".into()),
        _ => return Err("the .npy header has no 'descr'".into()),
    };
    let fortran = match get("fortran_order") {
        Some(Lit::Bool(b)) => *b,
        _ => return Err("the .npy header has no 'fortran_order'".into()),
    };
    let shape = match get("shape") {
        Some(Lit::Seq(dims)) => dims
            .iter()
            .map(|d| match d {
                Lit::Int(n) => usize::try_from(*n).map_err(|_| format!("bad dimension {n} in shape")),
                other => Err(format!("bad dimension {other:?} in shape")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        _ => return Err("the .npy header has no 'shape' tuple".into()),
    };
    Ok(Header { dtype, fortran, shape })
}

// ---------------------------------------------------------------------------------------
// Validation: from members to a Dataset

fn shape_str(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// A 2-D array as f32, or the reason it is not one.
fn matrix(raw: &Raw, key: &str, what: &str) -> std::result::Result<Array2, String> {
    let &[rows, cols] = raw.header.shape.as_slice() else {
        return Err(format!("'{key}' must be 2-D ({what}), got shape {}", shape_str(&raw.header.shape)));
    };
    Ok(Array2 { rows, cols, data: raw.decode(|v| v as f32) })
}

fn assemble(
    spikes: Option<Raw>,
    dt: Option<Raw>,
    behavior: Option<Raw>,
    latents: Option<Raw>,
    rates: Option<Raw>,
    trial_starts: Option<Raw>,
    index: &BTreeMap<String, usize>,
) -> std::result::Result<Dataset, String> {
    let found = || {
        let names: Vec<&str> = index.keys().map(|k| k.as_str()).collect();
        if names.is_empty() {
            "it holds no arrays".to_string()
        } else {
            format!("it holds: {}", names.join(", "))
        }
    };
    let spikes = spikes.ok_or_else(|| format!("missing array 'spikes' ({})", found()))?;
    let spikes = matrix(&spikes, "spikes", "bins x channels")?;
    if spikes.cols == 0 {
        return Err("'spikes' has no channels".into());
    }
    // Checked after the f32 conversion, so a float64 count beyond f32's range is caught too.
    if let Some(i) = spikes.data.iter().position(|v| !v.is_finite() || *v < 0.0) {
        let (v, t, n) = (spikes.data[i], i / spikes.cols, i % spikes.cols);
        let problem = if v.is_finite() { "a negative count" } else { "a non-finite count" };
        return Err(format!("'spikes' has {problem} ({v}) at bin {t}, channel {n}"));
    }
    let dt = dt.ok_or_else(|| format!("missing array 'dt' (the bin width in seconds; {})", found()))?;
    if dt.header.len() != 1 {
        return Err(format!("'dt' must be a scalar, got shape {}", shape_str(&dt.header.shape)));
    }
    let dt_value = dt.decode(|v| v)[0];
    if !(dt_value.is_finite() && (dt_value as f32) > 0.0) {
        return Err(format!("'dt' must be a positive bin width in seconds, got {dt_value}"));
    }
    let bins = spikes.rows;
    let rows_agree = |a: Array2, key: &str| -> std::result::Result<Array2, String> {
        if a.rows != bins {
            return Err(format!("'{key}' has {} rows but 'spikes' has {bins} (one row per bin)", a.rows));
        }
        Ok(a)
    };
    let behavior = behavior.map(|r| matrix(&r, "behavior", "bins x dims")).transpose()?;
    let behavior = behavior.map(|a| rows_agree(a, "behavior")).transpose()?;
    let latents = latents.map(|r| matrix(&r, "latents", "bins x latent dims")).transpose()?;
    let latents = latents.map(|a| rows_agree(a, "latents")).transpose()?;
    let rates = rates.map(|r| matrix(&r, "rates", "bins x channels")).transpose()?;
    let rates = rates.map(|a| rows_agree(a, "rates")).transpose()?;
    if let Some(r) = &rates {
        if r.cols != spikes.cols {
            return Err(format!("'rates' has {} channels but 'spikes' has {}", r.cols, spikes.cols));
        }
    }
    let trial_starts = match trial_starts {
        None => None,
        Some(r) => {
            if r.header.shape.len() != 1 {
                return Err(format!("'trial_starts' must be 1-D, got shape {}", shape_str(&r.header.shape)));
            }
            let mut starts = Vec::with_capacity(r.header.len());
            for (k, v) in r.decode(|v| v).into_iter().enumerate() {
                if !(v.fract() == 0.0 && v >= 0.0 && v < bins as f64) {
                    return Err(format!("'trial_starts'[{k}] = {v} is not a bin index in 0..{bins}"));
                }
                starts.push(v as usize);
            }
            Some(starts)
        }
    };
    Ok(Dataset { spikes, behavior, dt: dt_value as f32, latents, rates, trial_starts })
}

// ---------------------------------------------------------------------------------------
// Writing

enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

struct Member<'a> {
    name: &'a str,
    dtype: Dtype,
    shape: Vec<usize>,
    values: Values<'a>,
}

impl<'a> Member<'a> {
    fn matrix(name: &'a str, dtype: Dtype, arr: &'a Array2) -> Self {
        Member { name, dtype, shape: vec![arr.rows, arr.cols], values: Values::F32(&arr.data) }
    }
}

/// The `.npy` header, padded (as numpy does) so the data starts 64-byte aligned; version
/// 2.0 only when the header outgrows 1.0's 16-bit length.
fn npy_header(dtype: Dtype, shape: &[usize]) -> Vec<u8> {
    let dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", dtype.descr(), shape_str(shape));
    let (version, prefix) = if dict.len() + 11 + 64 <= u16::MAX as usize { (1u8, 10) } else { (2u8, 12) };
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    let len = total - prefix;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"\x93NUMPY");
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

fn encode(dtype: Dtype, v: f64, out: &mut Vec<u8>) {
    match dtype {
        Dtype::Bool => out.push((v != 0.0) as u8),
        Dtype::I1 => out.push(v as i8 as u8),
        Dtype::U1 => out.push(v as u8),
        Dtype::I2 => out.extend_from_slice(&(v as i16).to_le_bytes()),
        Dtype::U2 => out.extend_from_slice(&(v as u16).to_le_bytes()),
        Dtype::F2 => out.extend_from_slice(&f64_to_f16(v).to_le_bytes()),
        Dtype::I4 => out.extend_from_slice(&(v as i32).to_le_bytes()),
        Dtype::U4 => out.extend_from_slice(&(v as u32).to_le_bytes()),
        Dtype::F4 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        Dtype::I8 => out.extend_from_slice(&(v as i64).to_le_bytes()),
        Dtype::U8 => out.extend_from_slice(&(v as u64).to_le_bytes()),
        Dtype::F8 => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// f64 to binary16, round to nearest even (through f32; the double rounding this allows is
/// irrelevant for a type nobody stores sessions in, and it keeps the code short).
fn f64_to_f16(v: f64) -> u16 {
    let x = (v as f32).to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1; // may carry into the exponent, which is the correct rounding
    }
    sign | r as u16
}

fn zip_err(path: &Path, e: zip::result::ZipError) -> Error {
    match e {
        zip::result::ZipError::Io(e) => Error::io(path, e),
        other => Error::data(path, format!("cannot write the archive: {other}")),
    }
}

fn write_members(path: &Path, members: &[Member]) -> Result<()> {
    write_atomic(path, |file| {
        let mut zip = ZipWriter::new(BufWriter::new(file));
        let mut buf = Vec::with_capacity(1 << 16);
        for m in members {
            let n: usize = m.shape.iter().product();
            let len = match m.values {
                Values::F32(v) => v.len(),
                Values::F64(v) => v.len(),
            };
            if n != len {
                return Err(Error::Invalid(format!("array '{}': shape {:?} but {len} values", m.name, m.shape)));
            }
            let header = npy_header(m.dtype, &m.shape);
            let size = header.len() as u64 + (n * m.dtype.size()) as u64;
            let opts = SimpleFileOptions::default()
                .compression_method(CompressionMethod::Stored)
                .large_file(size >= u32::MAX as u64);
            zip.start_file(format!("{}.npy", m.name), opts).map_err(|e| zip_err(path, e))?;
            zip.write_all(&header).map_err(|e| Error::io(path, e))?;
            let flush = |buf: &mut Vec<u8>, zip: &mut ZipWriter<_>| -> Result<()> {
                zip.write_all(buf).map_err(|e| Error::io(path, e))?;
                buf.clear();
                Ok(())
            };
            for i in 0..n {
                let v = match m.values {
                    Values::F32(v) => v[i] as f64,
                    Values::F64(v) => v[i],
                };
                encode(m.dtype, v, &mut buf);
                if buf.len() >= (1 << 16) - 8 {
                    flush(&mut buf, &mut zip)?;
                }
            }
            flush(&mut buf, &mut zip)?;
        }
        let writer = zip.finish().map_err(|e| zip_err(path, e))?;
        writer.into_inner().map_err(|e| Error::io(path, e.into_error()))?.sync_all().map_err(|e| Error::io(path, e))
    })
}

/// Writes through a temporary file in the same directory and renames it over `path`, so
/// readers see either the old file or the complete new one.
fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| Error::data(path, "not a file name"))?;
    let tmp: PathBuf = path.with_file_name(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = File::create(&tmp)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|mut f| write(&mut f))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_literals() {
        let h = parse_header("{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }").unwrap();
        assert_eq!((h.dtype, h.fortran, h.shape), (Dtype::F8, false, vec![3, 4]));
        let h = parse_header("{\"shape\": (), \"fortran_order\": True, \"descr\": \"|b1\"}").unwrap();
        assert_eq!((h.dtype, h.fortran, h.shape), (Dtype::Bool, true, vec![]));
        let h = parse_header("{'descr': '<i8', 'fortran_order': False, 'shape': (7L,), }").unwrap();
        assert_eq!(h.shape, vec![7]);
        assert!(parse_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}")
            .unwrap_err()
            .contains("structured"));
        assert!(parse_header("{'descr': '<f8', 'fortran_order': False, 'shape': (-1,)}").is_err());
        assert!(parse_header("{'descr': '<f8', 'fortran_order': False, 'shape': (3,").is_err());
        assert!(parse_header("").is_err());
        assert!(parse_header("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[").is_err());
    }

    #[test]
    fn dtypes() {
        assert_eq!(Dtype::parse("<u2"), Ok(Dtype::U2));
        assert_eq!(Dtype::parse("|u1"), Ok(Dtype::U1));
        assert_eq!(Dtype::parse(">u1"), Ok(Dtype::U1));
        assert!(Dtype::parse(">f8").unwrap_err().contains("big-endian"));
        assert!(Dtype::parse("|O").unwrap_err().contains("object"));
        assert!(Dtype::parse("<c16").unwrap_err().contains("'<c16'"));
        assert!(Dtype::parse("<M8[ns]").unwrap_err().contains("unsupported dtype"));
        for d in [Dtype::Bool, Dtype::I1, Dtype::U1, Dtype::I2, Dtype::U2, Dtype::I4, Dtype::U4, Dtype::I8] {
            assert_eq!(Dtype::parse(d.descr()), Ok(d));
        }
    }

    #[test]
    fn header_is_aligned_and_parses_back() {
        for shape in [vec![], vec![5], vec![100_000, 300], vec![1; 40]] {
            let h = npy_header(Dtype::F4, &shape);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(*h.last().unwrap(), b'\n');
            let text: String = h[10..].iter().map(|&b| b as char).collect();
            assert_eq!(parse_header(&text).unwrap().shape, shape);
        }
    }

    #[test]
    fn fortran_reorder_3d() {
        // Shape (2, 3, 4): Fortran offset i + 2 j + 6 k holds the value 100 i + 10 j + k.
        let shape = [2, 3, 4];
        let mut f = vec![0.0; 24];
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    f[i + 2 * j + 6 * k] = (100 * i + 10 * j + k) as f64;
                }
            }
        }
        let c = fortran_to_c(&f, &shape);
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    assert_eq!(c[12 * i + 4 * j + k], (100 * i + 10 * j + k) as f64);
                }
            }
        }
    }

    #[test]
    fn half_precision() {
        for (bits, v) in [(0x3c00u16, 1.0), (0xc000, -2.0), (0x0001, 2f64.powi(-24)), (0x7bff, 65504.0), (0, 0.0)] {
            assert_eq!(f16_to_f64(bits), v);
            assert_eq!(f64_to_f16(v), bits);
        }
        assert!(f16_to_f64(0x7e00).is_nan());
        assert_eq!(f64_to_f16(1.0 + 2f64.powi(-11)), 0x3c00); // tie to even
        assert_eq!(f64_to_f16(1e6), 0x7c00);
    }
}
