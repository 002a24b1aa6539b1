//! liblsl, loaded at run time (libloading): the crate builds, and every other source runs,
//! on a machine without it. Where it is looked for, in order: `$LSL_LIB`; the library the
//! pylsl wheel ships (`<site-packages>/pylsl/lib/liblsl.so`, found under the virtual
//! environments and user/system site-packages, or by asking a Python that has pylsl); the
//! system's `liblsl.so`. Only the C API's stable calls are used (liblsl 1.14 or newer).
//!
//! Why not the `lsl` crate: it builds liblsl from source with cmake, which a fresh machine
//! does not have, and it would make LSL a build-time dependency of everything.

use std::ffi::{c_char, c_ulong, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub type StreamInfo = *mut c_void;
pub type InletPtr = *mut c_void;

/// `lsl_channel_format_t`.
pub const CF_FLOAT32: i32 = 1;
pub const CF_DOUBLE64: i32 = 2;
pub const CF_STRING: i32 = 3;
pub const CF_INT32: i32 = 4;
pub const CF_INT16: i32 = 5;
pub const CF_INT8: i32 = 6;
pub const CF_INT64: i32 = 7;
/// `lsl_error_code_t`: no error, timeout, the stream was lost.
pub const EC_OK: i32 = 0;
pub const EC_LOST: i32 = -2;

/// The C API calls latentloop uses.
pub struct Api {
    // The library stays loaded as long as the function pointers below are used.
    _lib: libloading::Library,
    pub path: String,
    pub resolve_byprop: unsafe extern "C" fn(*mut StreamInfo, u32, *const c_char, *const c_char, i32, f64) -> i32,
    pub resolve_all: unsafe extern "C" fn(*mut StreamInfo, u32, f64) -> i32,
    pub create_inlet: unsafe extern "C" fn(StreamInfo, i32, i32, i32) -> InletPtr,
    pub destroy_inlet: unsafe extern "C" fn(InletPtr),
    pub open_stream: unsafe extern "C" fn(InletPtr, f64, *mut i32),
    pub pull_chunk_f: unsafe extern "C" fn(InletPtr, *mut f32, *mut f64, c_ulong, c_ulong, f64, *mut i32) -> c_ulong,
    pub pull_sample_f: unsafe extern "C" fn(InletPtr, *mut f32, i32, f64, *mut i32) -> f64,
    pub pull_chunk_str:
        unsafe extern "C" fn(InletPtr, *mut *mut c_char, *mut f64, c_ulong, c_ulong, f64, *mut i32) -> c_ulong,
    pub destroy_string: unsafe extern "C" fn(*mut c_char),
    pub time_correction: unsafe extern "C" fn(InletPtr, f64, *mut i32) -> f64,
    pub local_clock: unsafe extern "C" fn() -> f64,
    pub get_channel_count: unsafe extern "C" fn(StreamInfo) -> i32,
    pub get_nominal_srate: unsafe extern "C" fn(StreamInfo) -> f64,
    pub get_channel_format: unsafe extern "C" fn(StreamInfo) -> i32,
    pub get_name: unsafe extern "C" fn(StreamInfo) -> *const c_char,
    pub get_type: unsafe extern "C" fn(StreamInfo) -> *const c_char,
    pub get_source_id: unsafe extern "C" fn(StreamInfo) -> *const c_char,
    pub destroy_streaminfo: unsafe extern "C" fn(StreamInfo),
    pub library_version: unsafe extern "C" fn() -> i32,
}

// SAFETY: liblsl's C API is thread-safe for these calls on distinct inlets (its documented
// contract); the pointers are plain function pointers into a library kept loaded.
unsafe impl Send for Api {}
// SAFETY: as above; nothing in Api is mutated after loading.
unsafe impl Sync for Api {}

impl Api {
    /// Loads liblsl from `path` and resolves every call, or says which one is missing.
    fn load(path: &str) -> Result<Api, String> {
        // SAFETY: loading a shared library runs its initialisers; liblsl's are its own
        // static set-up. The library is not unloaded while `Api` lives.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("{path}: {e}"))?;
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: the symbol is one of liblsl's C API functions, and the type it is
                // given is its prototype from include/lsl/*.h (checked against liblsl 1.18).
                let s = unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{path} has no {}: {e}", $name))?;
                *s
            }};
        }
        Ok(Api {
            resolve_byprop: sym!("lsl_resolve_byprop"),
            resolve_all: sym!("lsl_resolve_all"),
            create_inlet: sym!("lsl_create_inlet"),
            destroy_inlet: sym!("lsl_destroy_inlet"),
            open_stream: sym!("lsl_open_stream"),
            pull_chunk_f: sym!("lsl_pull_chunk_f"),
            pull_sample_f: sym!("lsl_pull_sample_f"),
            pull_chunk_str: sym!("lsl_pull_chunk_str"),
            destroy_string: sym!("lsl_destroy_string"),
            time_correction: sym!("lsl_time_correction"),
            local_clock: sym!("lsl_local_clock"),
            get_channel_count: sym!("lsl_get_channel_count"),
            get_nominal_srate: sym!("lsl_get_nominal_srate"),
            get_channel_format: sym!("lsl_get_channel_format"),
            get_name: sym!("lsl_get_name"),
            get_type: sym!("lsl_get_type"),
            get_source_id: sym!("lsl_get_source_id"),
            destroy_streaminfo: sym!("lsl_destroy_streaminfo"),
            library_version: sym!("lsl_library_version"),
            path: path.to_string(),
            _lib: lib,
        })
    }

    /// liblsl's version (e.g. 118 for 1.18).
    pub fn version(&self) -> i32 {
        // SAFETY: a function without arguments.
        unsafe { (self.library_version)() }
    }
}

/// Where pylsl's bundled library may be, without running Python: virtual environments
/// under `dirs` (and their parents), the user's and the system's site-packages.
fn wheel_candidates(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for d in dirs {
        for a in d.ancestors().take(4) {
            for venv in [".venv", "venv"] {
                roots.push(a.join(venv).join("lib"));
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local/lib"));
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v).join("lib"));
    }
    roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    let mut out = Vec::new();
    for r in roots {
        let Ok(entries) = std::fs::read_dir(&r) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("python3") {
                for sp in ["site-packages", "dist-packages"] {
                    out.push(e.path().join(sp).join("pylsl/lib/liblsl.so"));
                }
            }
        }
    }
    out
}

/// pylsl's library as a Python with pylsl reports it (LATENTLOOP_PYTHON, then python3).
fn ask_python() -> Option<PathBuf> {
    let code = "import os, pylsl; print(os.path.join(os.path.dirname(pylsl.__file__), 'lib', 'liblsl.so'))";
    let pythons = std::env::var("LATENTLOOP_PYTHON").into_iter().chain(["python3".to_string()]);
    for py in pythons {
        let out = std::process::Command::new(&py).args(["-c", code]).output().ok()?;
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Finds and loads liblsl (see the module doc); `dirs` are where to look for virtual
/// environments (the config's folder, the working directory). The error says what was
/// tried and how to get it.
pub fn find(dirs: &[PathBuf]) -> Result<Arc<Api>, String> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("LSL_LIB") {
        let p = p.to_string_lossy().into_owned();
        return Api::load(&p).map(Arc::new).map_err(|e| format!("LSL_LIB={p} cannot be loaded: {e}"));
    }
    tried.push("$LSL_LIB (unset)".to_string());
    let wheel = wheel_candidates(dirs).into_iter().find(|p| p.is_file()).or_else(ask_python);
    match wheel {
        Some(p) => match Api::load(&p.to_string_lossy()) {
            Ok(api) => return Ok(Arc::new(api)),
            Err(e) => tried.push(format!("pylsl's library: {e}")),
        },
        None => {
            tried.push("pylsl's bundled library (no pylsl found in the virtual environments or site-packages)".into())
        }
    }
    for name in ["liblsl.so", "liblsl.so.2", "liblsl.so.1"] {
        match Api::load(name) {
            Ok(api) => return Ok(Arc::new(api)),
            Err(_) => tried.push(format!("the system's {name}")),
        }
    }
    Err(format!(
        "kind = \"lsl\" needs liblsl, which was not found (tried {}). Get it with `pip install pylsl` (its wheel \
         ships liblsl: set LSL_LIB=<site-packages>/pylsl/lib/liblsl.so if it is not in a virtual environment here), \
         or install liblsl from your distribution or github.com/sccn/liblsl",
        tried.join("; ")
    ))
}

/// A stream's description, copied out of liblsl.
#[derive(Clone, Debug)]
pub struct Description {
    pub name: String,
    pub kind: String,
    pub source_id: String,
    pub channels: usize,
    pub srate: f64,
    pub format: i32,
}

/// A resolved stream's info, destroyed on drop (or taken by [`Inlet::open`]).
pub struct Resolved {
    api: Arc<Api>,
    ptr: StreamInfo,
}

impl Resolved {
    pub fn describe(&self) -> Description {
        // SAFETY: `ptr` is a live resolved info until this value is dropped.
        unsafe { Description::of(&self.api, self.ptr) }
    }
}

impl Drop for Resolved {
    fn drop(&mut self) {
        // SAFETY: resolve hands the infos to the caller; destroyed once, here.
        unsafe { (self.api.destroy_streaminfo)(self.ptr) };
    }
}

impl Description {
    /// Reads a stream info (which stays liblsl's).
    ///
    /// # Safety
    ///
    /// `info` must be a live stream info from liblsl (resolved, not yet destroyed).
    unsafe fn of(api: &Api, info: StreamInfo) -> Description {
        let s = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: liblsl returns NUL-terminated strings it owns, valid while `info` is.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        // SAFETY: the caller's contract: `info` is live.
        unsafe {
            Description {
                name: s((api.get_name)(info)),
                kind: s((api.get_type)(info)),
                source_id: s((api.get_source_id)(info)),
                channels: (api.get_channel_count)(info).max(0) as usize,
                srate: (api.get_nominal_srate)(info),
                format: (api.get_channel_format)(info),
            }
        }
    }

    pub fn format_name(&self) -> &'static str {
        match self.format {
            CF_FLOAT32 => "float32",
            CF_DOUBLE64 => "double64",
            CF_STRING => "string",
            CF_INT32 => "int32",
            CF_INT16 => "int16",
            CF_INT8 => "int8",
            CF_INT64 => "int64",
            _ => "undefined",
        }
    }
}

impl std::fmt::Display for Description {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "'{}' (type '{}', source_id '{}', {} {} channels at {} Hz)",
            self.name,
            self.kind,
            self.source_id,
            self.channels,
            self.format_name(),
            self.srate
        )
    }
}

/// Streams matching `prop = value` within `timeout` s (liblsl returns as soon as one is
/// found).
pub fn resolve(api: &Arc<Api>, prop: &str, value: &str, timeout: f64) -> Result<Vec<Resolved>, String> {
    let (p, v) = (CString::new(prop).map_err(|e| e.to_string())?, CString::new(value).map_err(|e| e.to_string())?);
    let mut buf: [StreamInfo; 16] = [std::ptr::null_mut(); 16];
    // SAFETY: `buf` holds 16 entries and liblsl writes at most that many; the strings are
    // NUL-terminated and live across the call.
    let n = unsafe { (api.resolve_byprop)(buf.as_mut_ptr(), 16, p.as_ptr(), v.as_ptr(), 1, timeout) };
    if n < 0 {
        return Err(format!("lsl_resolve_byprop failed ({n})"));
    }
    Ok(buf[..n as usize].iter().map(|&ptr| Resolved { api: api.clone(), ptr }).collect())
}

/// Every stream visible within `wait` s (for the message that lists them).
pub fn all_streams(api: &Arc<Api>, wait: f64) -> Vec<Description> {
    let mut buf: [StreamInfo; 64] = [std::ptr::null_mut(); 64];
    // SAFETY: as in `resolve`.
    let n = unsafe { (api.resolve_all)(buf.as_mut_ptr(), 64, wait) }.max(0) as usize;
    buf[..n].iter().map(|&ptr| Resolved { api: api.clone(), ptr }.describe()).collect()
}

/// An inlet, destroyed on drop.
pub struct Inlet {
    pub api: Arc<Api>,
    pub ptr: InletPtr,
}

// SAFETY: an inlet is used from one thread at a time (the acquisition thread owns it);
// liblsl allows an inlet to move between threads.
unsafe impl Send for Inlet {}

impl Inlet {
    /// An inlet on a resolved stream (whose info is destroyed after: the inlet keeps its
    /// own copy), buffering at most `max_buffer_s` seconds, with liblsl's recovery of a
    /// stream that comes back.
    pub fn open(info: Resolved, max_buffer_s: i32) -> Result<Inlet, String> {
        let api = info.api.clone();
        // SAFETY: `info.ptr` is a live resolved info; recover = 1.
        let ptr = unsafe { (api.create_inlet)(info.ptr, max_buffer_s.max(1), 0, 1) };
        drop(info);
        if ptr.is_null() {
            return Err("lsl_create_inlet failed".into());
        }
        let inlet = Inlet { api: api.clone(), ptr };
        let mut ec = 0;
        // SAFETY: a live inlet and an out-parameter.
        unsafe { (api.open_stream)(ptr, 10.0, &mut ec) };
        if ec != EC_OK {
            return Err(format!("cannot open the stream (lsl error {ec})"));
        }
        Ok(inlet)
    }

    /// LSL's estimate of remote-minus-local clock offset (0 until it has one); never waits.
    pub fn time_correction(&self) -> Option<f64> {
        let mut ec = 0;
        // SAFETY: a live inlet; timeout 0 returns at once.
        let tc = unsafe { (self.api.time_correction)(self.ptr, 0.0, &mut ec) };
        (ec == EC_OK).then_some(tc)
    }
}

impl Drop for Inlet {
    fn drop(&mut self) {
        // SAFETY: destroyed once; nothing uses `ptr` afterwards.
        unsafe { (self.api.destroy_inlet)(self.ptr) };
    }
}

/// CLOCK_MONOTONIC minus liblsl's clock, in ns: about 0, since liblsl's is
/// `std::chrono::steady_clock`, CLOCK_MONOTONIC on Linux; measured rather than assumed.
pub fn clock_offset_ns(api: &Api) -> i64 {
    // SAFETY: a function without arguments.
    let lsl = unsafe { (api.local_clock)() };
    let mono = crate::pipeline::clock::monotonic_ns() as f64 / 1e9;
    ((mono - lsl) * 1e9) as i64
}

/// Folders where a virtual environment with pylsl may be: the config's and the current one.
pub fn search_dirs(config: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = config.parent() {
        v.push(std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    }
    if let Ok(cwd) = std::env::current_dir() {
        v.push(cwd);
    }
    v
}
