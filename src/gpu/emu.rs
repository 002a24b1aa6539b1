//! The executor of the CPU emulation: runs the planned step's kernels from a shared library
//! built from kernels/*.cu plus kernels/emu/ (tests/gpu_emulated.rs builds it with the
//! system C++ compiler). Device pointers are plain host pointers into buffers owned here.

use super::batch::GpuBatch;
use super::exec::{Exec, Launch, A};
use crate::model::XfadsModel;
use cudarc::driver::sys::CUdeviceptr;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Arc;
use std::sync::Mutex;

type LaunchFn =
    unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, u32, u32, u32, *mut *mut c_void, c_int) -> c_int;

/// A launch with its kernel name as a C string.
type CLaunch = (CString, (u32, u32, u32), (u32, u32, u32), u32, Vec<A>);

/// The emulator keeps its scheduler in globals: one kernel at a time per process.
static LOCK: Mutex<()> = Mutex::new(());

pub(super) struct Emulator {
    launch: LaunchFn,
    reverse: bool,
    bufs: Vec<Vec<u32>>,
    host_in: Vec<u32>,
    host_out: Vec<f32>,
    ops: Vec<CLaunch>,
    /// Per launch, the argument pointers (into `ops`), made once so a step allocates nothing.
    argv: Vec<Vec<*mut c_void>>,
    din: CUdeviceptr,
    dout: CUdeviceptr,
}

impl Emulator {
    pub(super) fn open(lib: &std::path::Path, reverse: bool) -> Result<Emulator, String> {
        let path = CString::new(lib.as_os_str().as_encoded_bytes()).map_err(|_| "library path has a NUL byte")?;
        // SAFETY: dlopen/dlsym of a library we built; it is never closed.
        let launch = unsafe {
            let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if h.is_null() {
                let e = std::ffi::CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned();
                return Err(format!("cannot load the kernel emulator {}: {e}", lib.display()));
            }
            let sym = libc::dlsym(h, c"emu_launch".as_ptr());
            if sym.is_null() {
                return Err(format!("{} has no emu_launch", lib.display()));
            }
            std::mem::transmute::<*mut c_void, LaunchFn>(sym)
        };
        Ok(Emulator {
            launch,
            reverse,
            bufs: Vec::new(),
            host_in: Vec::new(),
            host_out: Vec::new(),
            ops: Vec::new(),
            argv: Vec::new(),
            din: 0,
            dout: 0,
        })
    }

    fn find(&self, p: CUdeviceptr, words: usize) -> Result<*mut u32, String> {
        for b in &self.bufs {
            let start = b.as_ptr() as u64;
            if p >= start && p + 4 * words as u64 <= start + 4 * b.len() as u64 {
                return Ok(p as *mut u32);
            }
        }
        Err(format!("address {p:#x} (+{words} words) is not inside an emulated buffer"))
    }
}

impl Exec for Emulator {
    fn alloc(&mut self, floats: usize) -> Result<CUdeviceptr, String> {
        self.bufs.push(vec![0u32; floats.max(1)]);
        Ok(self.bufs.last().unwrap().as_ptr() as CUdeviceptr)
    }
    fn upload(&mut self, dst: CUdeviceptr, bytes: &[u8]) -> Result<(), String> {
        let p = self.find(dst, bytes.len().div_ceil(4))?;
        // SAFETY: `find` checked the range.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p as *mut u8, bytes.len()) };
        Ok(())
    }
    fn host_buffers(&mut self, in_len: usize, out_len: usize) -> Result<(*mut u32, *mut f32), String> {
        self.host_in = vec![0; in_len.max(1)];
        self.host_out = vec![0.0; out_len.max(1)];
        Ok((self.host_in.as_mut_ptr(), self.host_out.as_mut_ptr()))
    }
    fn prepare(&mut self, ops: Vec<Launch>, din: CUdeviceptr, dout: CUdeviceptr) -> Result<(), String> {
        self.find(din, self.host_in.len())?;
        self.find(dout, self.host_out.len())?;
        self.ops = ops.into_iter().map(|(n, g, b, s, a)| (CString::new(n).unwrap(), g, b, s, a)).collect();
        self.argv = self
            .ops
            .iter_mut()
            .map(|op| {
                op.4.iter_mut()
                    .map(|a| match a {
                        A::P(p) => p as *mut u64 as *mut c_void,
                        A::I(i) => i as *mut i32 as *mut c_void,
                        A::L(v) => v as *mut i64 as *mut c_void,
                        A::F(x) => x as *mut f32 as *mut c_void,
                    })
                    .collect()
            })
            .collect();
        (self.din, self.dout) = (din, dout);
        Ok(())
    }
    fn run(&mut self) -> Result<(), String> {
        let _one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `din`/`dout` ranges were checked in `prepare`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.host_in.as_ptr(), self.din as *mut u32, self.host_in.len());
        }
        for ((name, g, b, smem, _), argv) in self.ops.iter().zip(self.argv.iter_mut()) {
            // SAFETY: the library's kernels take exactly these arguments (the same contract
            // as the CUDA launch); every pointer argument is one of our buffers.
            let rc = unsafe {
                (self.launch)(
                    name.as_ptr(),
                    g.0,
                    g.1,
                    g.2,
                    b.0,
                    b.1,
                    b.2,
                    *smem,
                    argv.as_mut_ptr(),
                    self.reverse as c_int,
                )
            };
            if rc != 0 {
                return Err(format!("emulated kernel {name:?} failed ({rc})"));
            }
        }
        // SAFETY: as for the input copy above.
        unsafe {
            std::ptr::copy_nonoverlapping(self.dout as *const f32, self.host_out.as_mut_ptr(), self.host_out.len());
        }
        Ok(())
    }
    fn download(&mut self, src: CUdeviceptr, dst: &mut [f32]) -> Result<(), String> {
        let p = self.find(src, dst.len())?;
        // SAFETY: `find` checked the range.
        unsafe { std::ptr::copy_nonoverlapping(p as *const f32, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

impl GpuBatch {
    /// The same batch with the kernels compiled as C++ and run on the CPU (a cooperative
    /// thread-per-fiber emulation of blocks, `kernels/emu/`), built by tests/gpu_emulated.rs:
    /// checks the kernels' arithmetic and indexing on machines without a GPU. `reverse` runs
    /// each block's threads in reverse order between barriers, which exposes a missing
    /// `__syncthreads`. Slow; for tests only.
    #[doc(hidden)]
    pub fn emulated(
        lib: &std::path::Path,
        model: Arc<XfadsModel>,
        samples: Option<usize>,
        seeds: &[u64],
        reverse: bool,
    ) -> Result<GpuBatch, String> {
        let models = vec![model; seeds.len()];
        Self::build(Box::new(Emulator::open(lib, reverse)?), &models, true, samples, seeds)
    }
}
