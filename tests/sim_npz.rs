//! .npz reading and writing (against numpy where one is available) and the synthetic rigs.

mod common;

use latentloop::data::npz::{read_arrays, write_arrays, Dtype, NpyArray};
use latentloop::data::{Array2, Dataset};
use latentloop::sim::{poisson, simulate, SimConfig, SimRig, System, Uniforms};
use latentloop::Error;
use nalgebra::DMatrix;
use std::io::Write;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// Allocation counting (for "next_bin allocates nothing"), per thread so parallel tests do
// not disturb each other.

#[path = "common/alloc_count.rs"]
mod alloc_count;
use alloc_count::on_this_thread as allocations;

// ---------------------------------------------------------------------------------------
// Helpers

fn small_session() -> Dataset {
    let mut cfg = SimConfig::new(System::Lorenz, 7, 21, 22);
    cfg.behavior_dims = 3;
    let mut ds = simulate(&cfg, 400).unwrap();
    ds.trial_starts = Some(vec![0, 150, 399]);
    ds
}

/// Asserts `r` is a data error about `path` whose message contains every one of `needles`.
fn assert_data_err<T: std::fmt::Debug>(r: latentloop::Result<T>, path: &Path, needles: &[&str]) {
    match r {
        Err(Error::Data { path: p, msg }) => {
            assert_eq!(p, path, "error names the file");
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
            }
        }
        other => panic!("expected a data error containing {needles:?}, got {other:?}"),
    }
}

/// A .npy member built by hand (for dtypes and byte orders our writer never produces).
fn npy(descr: &str, shape: &str, fortran: bool, data: &[u8]) -> Vec<u8> {
    let f = if fortran { "True" } else { "False" };
    npy_dict(&format!("{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {shape}, }}"), data)
}

fn npy_dict(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut h = dict.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

fn raw_npz(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        z.start_file(format!("{name}.npy"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

fn f8(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn arr(shape: &[usize], dtype: Dtype, data: Vec<f64>) -> NpyArray {
    NpyArray::new(shape.to_vec(), dtype, data)
}

fn dt_scalar() -> NpyArray {
    arr(&[], Dtype::F8, vec![0.02])
}

fn py() -> Option<PathBuf> {
    common::python_with(&["numpy"])
}

// ---------------------------------------------------------------------------------------
// npz: our own round trip

#[test]
fn npz_round_trip_is_exact() {
    let dir = common::tmpdir("npz_round_trip");
    let ds = small_session();
    let path = dir.join("s.npz");
    ds.write_npz(&path).unwrap();
    assert_eq!(Dataset::read_npz(&path).unwrap(), ds);

    // The stored dtypes: integral spikes as int32, everything else as documented.
    let arrays = read_arrays(&path).unwrap();
    let keys: Vec<&str> = arrays.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["behavior", "dt", "latents", "rates", "spikes", "trial_starts"]);
    assert_eq!(arrays["spikes"].dtype, Dtype::I4);
    assert_eq!(arrays["behavior"].dtype, Dtype::F4);
    assert_eq!(arrays["dt"].dtype, Dtype::F8);
    assert_eq!(arrays["dt"].shape, Vec::<usize>::new());
    assert_eq!(arrays["dt"].data, vec![0.02]); // the decimal 0.02, not f32's 0.0199999995...
    assert_eq!(arrays["trial_starts"].dtype, Dtype::I8);
    assert_eq!(arrays["latents"].shape, vec![400, 3]);

    // Non-integral spikes stay float; optional arrays stay absent; overwriting works and
    // leaves no temporary file behind.
    let mut other = ds.slice(10, 30);
    other.spikes.data[5] = 0.5;
    other.behavior = None;
    other.latents = None;
    other.rates = None;
    other.trial_starts = None;
    other.dt = 0.001;
    other.write_npz(&path).unwrap();
    assert_eq!(Dataset::read_npz(&path).unwrap(), other);
    assert_eq!(read_arrays(&path).unwrap()["spikes"].dtype, Dtype::F4);
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("s.npz")]);

    // Zero bins is a valid (if useless) session.
    let empty = ds.slice(0, 0);
    empty.write_npz(&path).unwrap();
    assert_eq!(Dataset::read_npz(&path).unwrap().bins(), 0);
}

#[test]
fn write_arrays_round_trips_every_dtype() {
    let dir = common::tmpdir("npz_dtypes_ours");
    let path = dir.join("a.npz");
    let cases = [
        (Dtype::Bool, vec![1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
        (Dtype::I1, vec![-128.0, 127.0, 0.0, -1.0, 5.0, 6.0]),
        (Dtype::U1, vec![255.0, 0.0, 1.0, 2.0, 3.0, 4.0]),
        (Dtype::I2, vec![-32768.0, 32767.0, 0.0, -1.0, 5.0, 6.0]),
        (Dtype::U2, vec![65535.0, 0.0, 1.0, 2.0, 3.0, 4.0]),
        (Dtype::I4, vec![-2147483648.0, 2147483647.0, 0.0, -1.0, 5.0, 6.0]),
        (Dtype::U4, vec![4294967295.0, 0.0, 1.0, 2.0, 3.0, 4.0]),
        (Dtype::I8, vec![-9.0e15, 9.0e15, 0.0, -1.0, 5.0, 6.0]),
        (Dtype::U8, vec![1.8e19, 0.0, 1.0, 2.0, 3.0, 4.0]),
        (Dtype::F2, vec![0.5, -2.0, 65504.0, 0.0, 1.0, -0.25]),
        (Dtype::F4, vec![0.1f32 as f64, -2.5, 3.0e38f32 as f64, 0.0, 1.0, -0.25]),
        (Dtype::F8, vec![0.1, -2.5, 1.0e300, 0.0, f64::MIN_POSITIVE, -0.25]),
    ];
    let arrays: Vec<(String, NpyArray)> =
        cases.iter().map(|(d, v)| (format!("{d:?}"), arr(&[2, 3], *d, v.clone()))).collect();
    let refs: Vec<(&str, &NpyArray)> = arrays.iter().map(|(n, a)| (n.as_str(), a)).collect();
    write_arrays(&path, &refs).unwrap();
    let back = read_arrays(&path).unwrap();
    for (name, a) in &arrays {
        assert_eq!(&back[name], a, "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// npz: numpy reads ours, we read numpy's

#[test]
fn numpy_reads_our_files() {
    let Some(py) = py() else { return };
    let dir = common::tmpdir("npz_numpy_reads");
    let ds = small_session();
    let path = dir.join("ours.npz");
    ds.write_npz(&path).unwrap();
    let code = r#"
import sys, json, numpy as np
bits = lambda a: np.asarray(a, dtype=np.float64).ravel().view(np.uint64).tolist()
with np.load(sys.argv[1]) as f:
    out = {k: {"shape": list(f[k].shape), "dtype": f[k].dtype.str} for k in f.files}
    out["dt_value"] = bits(f["dt"])
    out["spikes_3"] = bits(f["spikes"][3])
    out["behavior_17"] = bits(f["behavior"][17])
    out["latents_last"] = bits(f["latents"][-1])
    out["rates_sum"] = bits(f["rates"].astype(np.float64).sum())
    out["starts_values"] = bits(f["trial_starts"])
print(json.dumps(out))
"#;
    let out = common::run_python(&py, code, &[path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let shape =
        |k: &str| -> Vec<u64> { v[k]["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect() };
    assert_eq!(shape("spikes"), [400, 7]);
    assert_eq!(shape("behavior"), [400, 3]);
    assert_eq!(shape("latents"), [400, 3]);
    assert_eq!(shape("rates"), [400, 7]);
    assert_eq!(shape("dt"), Vec::<u64>::new());
    assert_eq!(shape("trial_starts"), [3]);
    for (k, d) in [("spikes", "<i4"), ("behavior", "<f4"), ("latents", "<f4"), ("rates", "<f4"), ("dt", "<f8")] {
        assert_eq!(v[k]["dtype"], d, "{k}");
    }
    assert_eq!(v["trial_starts"]["dtype"], "<i8");
    // Values travel as f64 bit patterns: decimal text could be parsed a rounding off.
    let floats = |k: &str| -> Vec<f64> {
        v[k].as_array().unwrap().iter().map(|x| f64::from_bits(x.as_u64().unwrap())).collect()
    };
    assert_eq!(floats("dt_value"), [0.02]);
    let spikes3: Vec<f64> = ds.spikes.row(3).iter().map(|&x| x as f64).collect();
    assert_eq!(floats("spikes_3"), spikes3);
    let b17: Vec<f64> = ds.behavior.as_ref().unwrap().row(17).iter().map(|&x| x as f64).collect();
    assert_eq!(floats("behavior_17"), b17);
    let last: Vec<f64> = ds.latents.as_ref().unwrap().row(399).iter().map(|&x| x as f64).collect();
    assert_eq!(floats("latents_last"), last);
    let rates_sum: f64 = ds.rates.as_ref().unwrap().data.iter().map(|&x| x as f64).sum();
    assert!((floats("rates_sum")[0] - rates_sum).abs() <= 1e-9 * rates_sum);
    assert_eq!(floats("starts_values"), [0.0, 150.0, 399.0]);
}

#[test]
fn we_read_numpy_sessions() {
    let Some(py) = py() else { return };
    let dir = common::tmpdir("npz_numpy_writes");
    let (a, b) = (dir.join("compressed.npz"), dir.join("plain.npz"));
    let code = r#"
import sys, numpy as np
T = 23
spikes = ((np.arange(T * 5).reshape(T, 5) * 7) % 11 - 1).clip(0).astype(np.int16)
behavior = (np.arange(T * 2).reshape(T, 2) - 17.0) / 8.0
latents = np.asfortranarray((((np.arange(T * 3).reshape(T, 3) * 3) % 17 - 8) / 4).astype(np.float32))
assert latents.flags.f_contiguous and not latents.flags.c_contiguous
rates = (np.arange(T * 5).reshape(T, 5) / 16.0).astype(np.float32)
np.savez_compressed(sys.argv[1], spikes=spikes, behavior=behavior, latents=latents, rates=rates,
                    dt=np.array(0.025), trial_starts=np.array([0, 10], dtype=np.int64))
# np.savez: stored members, other dtypes, a Fortran-ordered float32 behaviour, a float32
# 0-d dt, and an extra array (a string) the dataset must ignore.
np.savez(sys.argv[2], spikes=spikes.astype(np.uint8), behavior=np.asfortranarray(behavior.astype(np.float32)),
         dt=np.float32(0.01), notes=np.array(["rig 7"]))
"#;
    common::run_python(&py, code, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let t = 23usize;
    let spikes: Vec<f32> = (0..t * 5).map(|i| (((i * 7) % 11) as f32 - 1.0).max(0.0)).collect();
    let behavior: Vec<f32> = (0..t * 2).map(|i| (i as f32 - 17.0) / 8.0).collect();
    let latents: Vec<f32> = (0..t * 3).map(|i| (((i * 3) % 17) as f32 - 8.0) / 4.0).collect();
    let rates: Vec<f32> = (0..t * 5).map(|i| i as f32 / 16.0).collect();

    let ds = Dataset::read_npz(&a).unwrap();
    assert_eq!(ds.spikes, Array2::new(t, 5, spikes.clone()));
    assert_eq!(ds.behavior, Some(Array2::new(t, 2, behavior.clone())));
    assert_eq!(ds.latents, Some(Array2::new(t, 3, latents)));
    assert_eq!(ds.rates, Some(Array2::new(t, 5, rates)));
    assert_eq!(ds.dt, 0.025);
    assert_eq!(ds.trial_starts, Some(vec![0, 10]));

    let ds = Dataset::read_npz(&b).unwrap();
    assert_eq!(ds.spikes, Array2::new(t, 5, spikes));
    assert_eq!(ds.behavior, Some(Array2::new(t, 2, behavior)));
    assert_eq!((ds.latents, ds.rates, ds.trial_starts), (None, None, None));
    assert_eq!(ds.dt, 0.01);
    // The lower-level reader is strict about every member, and names the odd one out.
    assert_data_err(read_arrays(&b), &b, &["'notes'", "unsupported dtype '<U5'"]);
}

/// Every supported dtype, C and Fortran order, 0-d to 3-d, stored and deflated, and .npy
/// format versions 1.0, 2.0 and 3.0; values compared exactly with what numpy holds.
#[test]
fn we_read_every_numpy_dtype_and_format_version() {
    let Some(py) = py() else { return };
    let dir = common::tmpdir("npz_numpy_dtypes");
    let path = dir.join("all.npz");
    let code = r#"
import sys, io, json, zipfile, numpy as np
base = np.array([[0, 1, -2], [3, -4, 5]])
arrays = {}
for d in ["?", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"]:
    vals = np.abs(base) if d[0] in "u?" else base
    arrays[d] = vals.astype(d)
arrays["u8_big"] = np.array([2**64 - 1, 2**53], dtype=np.uint64)
arrays["i8_min"] = np.array([-2**63, 2**53 - 1], dtype=np.int64)
arrays["f4_fine"] = np.array([0.1, 1e-30, 3.4e38, -0.0], dtype=np.float32)
arrays["f8_fine"] = np.array([0.1, 1e-300, np.pi], dtype=np.float64)
arrays["scalar"] = np.array(7.25)
arrays["empty"] = np.zeros((0, 4), dtype=np.float32)
arrays["fortran3"] = np.asfortranarray(np.arange(24, dtype=np.int32).reshape(2, 3, 4) * 3 - 20)
arrays["fortran2_u2"] = np.asfortranarray((np.arange(12).reshape(3, 4) * 1000).astype(np.uint16))
# Values as f64 bit patterns (exact, unlike decimal text), in C order.
bits = lambda v: np.ascontiguousarray(v).astype(np.float64).ravel().view(np.uint64).tolist()
expect = {k: {"shape": list(v.shape), "data": bits(v)} for k, v in arrays.items()}
with zipfile.ZipFile(sys.argv[1], "w") as z:
    for i, (k, v) in enumerate(arrays.items()):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, v, version=[(1, 0), (2, 0), (3, 0)][i % 3])
        z.writestr(k + ".npy", buf.getvalue(), compress_type=[zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED][i % 2])
print(json.dumps(expect))
"#;
    let out = common::run_python(&py, code, &[path.to_str().unwrap()]);
    let expect: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got = read_arrays(&path).unwrap();
    let expect = expect.as_object().unwrap();
    assert_eq!(got.len(), expect.len());
    for (k, e) in expect {
        let a = &got[k];
        let shape: Vec<usize> = e["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let data: Vec<u64> = e["data"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(a.shape, shape, "{k}");
        assert_eq!(a.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), data, "{k}");
    }
    assert_eq!(got["?"].dtype, Dtype::Bool);
    assert_eq!(got["f2"].dtype, Dtype::F2);
}

// ---------------------------------------------------------------------------------------
// npz: bad input names the problem and never panics

#[test]
fn bad_files_give_data_errors() {
    let dir = common::tmpdir("npz_bad");
    let good = dir.join("good.npz");
    small_session().write_npz(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let p = dir.join("truncated.npz");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_data_err(Dataset::read_npz(&p), &p, &["truncated or corrupt"]);
    let shown = Dataset::read_npz(&p).unwrap_err().to_string();
    assert!(shown.starts_with("data file ") && shown.contains("truncated.npz"), "{shown}");
    std::fs::write(&p, &bytes[..10]).unwrap();
    assert_data_err(Dataset::read_npz(&p), &p, &["truncated or corrupt"]);
    std::fs::write(&p, b"").unwrap();
    assert_data_err(Dataset::read_npz(&p), &p, &["truncated or corrupt"]);

    // A flipped byte inside the spike data: the member's CRC no longer matches.
    let p = dir.join("corrupt.npz");
    let mut bad = bytes.clone();
    let at = bytes.windows(10).position(|w| w == b"spikes.npy").unwrap() + 200;
    bad[at] ^= 0x5a;
    std::fs::write(&p, &bad).unwrap();
    assert_data_err(Dataset::read_npz(&p), &p, &["'spikes'", "corrupt"]);

    let p = dir.join("text.npz");
    std::fs::write(&p, "spikes,dt\n1,2\n").unwrap();
    assert_data_err(Dataset::read_npz(&p), &p, &["not a readable .npz"]);

    let p = dir.join("single.npz");
    std::fs::write(&p, npy("<f8", "(2,)", false, &f8(&[1.0, 2.0]))).unwrap();
    assert_data_err(Dataset::read_npz(&p), &p, &[".npy file"]);

    let missing = dir.join("nope.npz");
    assert!(matches!(Dataset::read_npz(&missing), Err(Error::Io { .. })));

    let spikes = arr(&[4, 2], Dtype::F4, vec![0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]);
    let case = |name: &str, arrays: &[(&str, &NpyArray)], needles: &[&str]| {
        let p = dir.join(format!("{name}.npz"));
        write_arrays(&p, arrays).unwrap();
        assert_data_err(Dataset::read_npz(&p), &p, needles);
    };
    let dt = dt_scalar();
    case("no_spikes", &[("dt", &dt)], &["missing array 'spikes'", "it holds: dt"]);
    case("no_dt", &[("spikes", &spikes)], &["missing array 'dt'"]);
    let flat = arr(&[8], Dtype::F4, spikes.data.clone());
    case("flat_spikes", &[("spikes", &flat), ("dt", &dt)], &["'spikes' must be 2-D", "(8,)"]);
    let b3 = arr(&[3, 2], Dtype::F8, vec![0.0; 6]);
    case("rows", &[("spikes", &spikes), ("behavior", &b3), ("dt", &dt)], &["'behavior' has 3 rows", "'spikes' has 4"]);
    let l5 = arr(&[5, 3], Dtype::F4, vec![0.0; 15]);
    case("latent_rows", &[("spikes", &spikes), ("latents", &l5), ("dt", &dt)], &["'latents' has 5 rows"]);
    let r3 = arr(&[4, 3], Dtype::F4, vec![1.0; 12]);
    case("rate_cols", &[("spikes", &spikes), ("rates", &r3), ("dt", &dt)], &["'rates' has 3 channels"]);
    let mut nan = spikes.clone();
    nan.data[5] = f64::NAN;
    case("nan", &[("spikes", &nan), ("dt", &dt)], &["non-finite count", "NaN", "bin 2, channel 1"]);
    let mut inf = spikes.clone();
    inf.data[0] = 1e300; // finite in f64, infinite as the f32 a session holds
    inf.dtype = Dtype::F8;
    case("inf", &[("spikes", &inf), ("dt", &dt)], &["non-finite count"]);
    let mut neg = spikes.clone();
    neg.data[3] = -1.0;
    case("negative", &[("spikes", &neg), ("dt", &dt)], &["negative count", "bin 1, channel 1"]);
    let zero_dt = arr(&[], Dtype::F8, vec![0.0]);
    case("dt_zero", &[("spikes", &spikes), ("dt", &zero_dt)], &["'dt' must be a positive"]);
    let vec_dt = arr(&[2], Dtype::F8, vec![0.02, 0.02]);
    case("dt_vector", &[("spikes", &spikes), ("dt", &vec_dt)], &["'dt' must be a scalar"]);
    let starts = arr(&[2], Dtype::I8, vec![0.0, 4.0]);
    case("starts", &[("spikes", &spikes), ("dt", &dt), ("trial_starts", &starts)], &["'trial_starts'[1] = 4"]);

    // dtypes and headers our writer never produces.
    let hand = |name: &str, member: Vec<u8>, needles: &[&str]| {
        let p = dir.join(format!("{name}.npz"));
        raw_npz(&p, &[("spikes", member), ("dt", npy("<f8", "()", false, &f8(&[0.02])))]);
        assert_data_err(Dataset::read_npz(&p), &p, needles);
        assert_data_err(read_arrays(&p), &p, needles);
    };
    let be: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|x| x.to_be_bytes()).collect();
    hand("big_endian", npy(">f8", "(1, 2)", false, &be), &["'spikes'", "big-endian dtype '>f8'"]);
    hand("complex", npy("<c16", "(1, 1)", false, &[0; 16]), &["'spikes'", "unsupported dtype '<c16'"]);
    hand("object", npy("|O", "(1, 1)", false, &[0; 8]), &["'spikes'", "object arrays"]);
    hand("short_data", npy("<f8", "(10, 3)", false, &f8(&[1.0, 2.0])), &["'spikes' is truncated", "240 bytes"]);
    hand("no_magic", b"PK not numpy".to_vec(), &["not a .npy array"]);
    hand("version", b"\x93NUMPY\x07\x00\x10\x00{}".to_vec(), &["format version 7.0"]);
    hand("short_header", b"\x93NUMPY\x01\x00\xff\x00{'descr'".to_vec(), &["truncated .npy header"]);
    hand("bad_header", npy("<f8", "(1, 'x')", false, &[0; 8]), &["bad dimension"]);
    let structured = "{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,), }";
    hand("structured", npy_dict(structured, &[0; 8]), &["structured"]);
}

// ---------------------------------------------------------------------------------------
// Simulator

fn cfg(system: System, neurons: usize, seed: u64, trial_seed: u64) -> SimConfig {
    SimConfig::new(system, neurons, seed, trial_seed)
}

#[test]
fn simulation_is_reproducible_bit_for_bit() {
    for system in System::ALL {
        let c = cfg(system, 9, 5, 6);
        let a = simulate(&c, 700).unwrap();
        let b = simulate(&c, 700).unwrap();
        let bits = |d: &Dataset| -> Vec<u32> {
            [&d.spikes, d.rates.as_ref().unwrap(), d.latents.as_ref().unwrap(), d.behavior.as_ref().unwrap()]
                .iter()
                .flat_map(|a| a.data.iter().map(|x| x.to_bits()))
                .collect()
        };
        assert_eq!(bits(&a), bits(&b), "{system}");
        // A shorter run is a prefix of a longer one (streaming has no look-ahead).
        assert_eq!(simulate(&c, 300).unwrap(), a.slice(0, 300), "{system}");
        assert_eq!(a.dt, 0.02);
    }
}

#[test]
fn trial_seed_changes_the_trial_but_not_the_system() {
    for system in System::ALL {
        let (r1, r2) = (SimRig::new(&cfg(system, 12, 77, 1)).unwrap(), SimRig::new(&cfg(system, 12, 77, 2)).unwrap());
        assert_eq!(r1.readout(), r2.readout());
        assert_eq!(r1.behavior_map(), r2.behavior_map());
        assert_eq!(r1.latent_standardisation(), r2.latent_standardisation());
        let other = SimRig::new(&cfg(system, 12, 78, 1)).unwrap();
        assert_ne!(r1.readout(), other.readout());
        assert!(r1.readout().iter().all(|w| (-0.5..0.5).contains(w)));

        // Trial 2's rates are the SAME function of its latents as the system of trial 1
        // computes: one readout and one drive normalisation, bit for bit.
        let d2 = simulate(&cfg(system, 12, 77, 2), 500).unwrap();
        let d1 = simulate(&cfg(system, 12, 77, 1), 500).unwrap();
        let (l2, rates2) = (d2.latents.as_ref().unwrap(), d2.rates.as_ref().unwrap());
        let mut r = vec![0.0f32; 12];
        for t in 0..500 {
            r1.rates_from_latents(l2.row(t), &mut r);
            assert_eq!(r, rates2.row(t), "{system} bin {t}");
        }
        assert_ne!(d1.spikes, d2.spikes, "{system}");
        assert_ne!(d1.latents, d2.latents, "{system}");
    }
}

#[test]
fn latents_are_bounded_standardised_and_moving() {
    for system in System::ALL {
        let d = simulate(&cfg(system, 4, 3, 4), 20_000).unwrap();
        let l = d.latents.as_ref().unwrap();
        for k in 0..l.cols {
            let col: Vec<f64> = (0..l.rows).map(|t| l.row(t)[k] as f64).collect();
            let mean = col.iter().sum::<f64>() / col.len() as f64;
            let sd = (col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / col.len() as f64).sqrt();
            let max = col.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            // Standardised with the system's reference statistics, so one trial is close to,
            // not exactly, mean 0 and s.d. 1 (Arneodo's slow side-switching moves a 20,000-bin
            // mean by up to ~0.4 s.d.). Rossler's z has excursions to ~8 s.d.
            assert!(mean.abs() < 0.6 && (0.6..1.4).contains(&sd), "{system} dim {k}: mean {mean} sd {sd}");
            assert!(max < 10.0, "{system} dim {k}: max |latent| {max}");
            // Non-constant on the bin scale too: consecutive bins differ.
            let moved = (1..col.len()).filter(|&t| col[t] != col[t - 1]).count();
            assert!(moved > 19_900, "{system} dim {k}");
        }
    }
}

/// Mean rate per neuron. For a Gaussian drive d ~ N(0, 1), E[exp(d)] = e^{1/2} = 1.6487.
/// - linear: the drive IS N(0, 1) in the stationary state, so only sampling error remains.
///   exp(d) has s.d. sqrt(e (e - 1)) = 2.16; the rotations make the integrated
///   autocorrelation time short (~2 bins), so 20,000 bins give s.e. ~0.02 (1.2%); 6% is
///   five s.e.
/// - lorenz: the drive is unit-variance but NOT Gaussian (x, y are bimodal, z right-skewed);
///   over all readout directions E[exp(d)] spans [1.36, 2.17] on the attractor (scanned
///   offline), so each neuron must lie in that range widened by the ~3% trial error, and the
///   average over 60 random directions within 8% of e^{1/2}.
///
/// Spike counts average to the rates (Poisson): total spikes within 5 s.e. of total rate.
#[test]
fn mean_rates_match_the_lognormal_prediction() {
    let expect = 0.5f64.exp();
    for system in [System::Linear, System::Lorenz] {
        let n = 60;
        let d = simulate(&cfg(system, n, 11, 12), 20_000).unwrap();
        let (rates, t) = (d.rates.as_ref().unwrap(), d.bins());
        let means: Vec<f64> = (0..n).map(|j| (0..t).map(|i| rates.row(i)[j] as f64).sum::<f64>() / t as f64).collect();
        for (j, &m) in means.iter().enumerate() {
            match system {
                System::Linear => assert!((m / expect - 1.0).abs() < 0.06, "linear neuron {j}: {m}"),
                _ => assert!((1.30..2.25).contains(&m), "lorenz neuron {j}: {m}"),
            }
        }
        let avg = means.iter().sum::<f64>() / n as f64;
        assert!((avg / expect - 1.0).abs() < 0.08, "{system}: population mean rate {avg}");
        let total_rate: f64 = rates.data.iter().map(|&r| r as f64).sum();
        let total_spikes: f64 = d.spikes.data.iter().map(|&s| s as f64).sum();
        assert!(
            (total_spikes - total_rate).abs() < 5.0 * total_rate.sqrt(),
            "{system}: {total_spikes} vs {total_rate}"
        );
        assert!(d.spikes.data.iter().all(|&s| s >= 0.0 && s.fract() == 0.0));
    }
}

/// Poisson(m) over n draws: the mean's s.e. is sqrt(m / n), the sample variance's
/// sqrt((m + 2 m^2) / n); both within 5 s.e. Means on both sides of the inversion / PTRS
/// switch at 10. (The sampler's own unit tests add a chi-square test against the pmf.)
#[test]
fn poisson_sampler_mean_and_variance() {
    let n = 100_000;
    for (i, &m) in [0.2, 1.6487, 7.0, 10.5, 40.0, 500.0].iter().enumerate() {
        let mut u = Uniforms::new(4242, i as u64, 3);
        let mut next = || u.next_f64();
        let x: Vec<f64> = (0..n).map(|_| poisson(m, &mut next) as f64).collect();
        let mean = x.iter().sum::<f64>() / n as f64;
        let var = x.iter().map(|k| (k - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!((mean - m).abs() < 5.0 * (m / n as f64).sqrt(), "mean {m}: {mean}");
        assert!((var - m).abs() < 5.0 * ((m + 2.0 * m * m) / n as f64).sqrt(), "mean {m}: variance {var}");
    }
}

/// Behaviour = B l + N(0, 0.05^2): an affine least-squares fit from the latents explains
/// all but the noise (R^2 ~ 0.997 for unit-variance behaviour).
#[test]
fn behaviour_is_a_near_linear_function_of_the_latents() {
    for system in System::ALL {
        let mut c = cfg(system, 3, 8, 9);
        c.behavior_dims = 2;
        let d = simulate(&c, 5_000).unwrap();
        let (l, b) = (d.latents.as_ref().unwrap(), d.behavior.as_ref().unwrap());
        let x = DMatrix::from_fn(l.rows, l.cols + 1, |t, k| if k < l.cols { l.row(t)[k] as f64 } else { 1.0 });
        let y = DMatrix::from_fn(b.rows, b.cols, |t, k| b.row(t)[k] as f64);
        let coef = (x.transpose() * &x).cholesky().unwrap().solve(&(x.transpose() * &y));
        let resid = &y - &x * coef;
        for k in 0..b.cols {
            let col = y.column(k);
            let mean = col.mean();
            let ss_tot: f64 = col.iter().map(|v| (v - mean).powi(2)).sum();
            let ss_res: f64 = resid.column(k).iter().map(|v| v * v).sum();
            let r2 = 1.0 - ss_res / ss_tot;
            assert!(r2 > 0.95, "{system} behaviour dim {k}: R^2 {r2}");
            // The residual is the behaviour noise.
            let sd = (ss_res / b.rows as f64).sqrt();
            assert!((sd - 0.05).abs() < 0.005, "{system} behaviour dim {k}: residual s.d. {sd}");
        }
    }
}

#[test]
fn next_bin_allocates_nothing() {
    for system in System::ALL {
        let mut c = cfg(system, 40, 1, 2);
        c.behavior_dims = 3;
        let mut rig = SimRig::new(&c).unwrap();
        let (mut s, mut r) = (vec![0.0; 40], vec![0.0; 40]);
        let (mut l, mut b) = (vec![0.0; rig.latent_dims()], vec![0.0; 3]);
        rig.next_bin(&mut s, &mut r, &mut l, &mut b);
        let before = allocations();
        for _ in 0..500 {
            rig.next_bin(&mut s, &mut r, &mut l, &mut b);
        }
        assert_eq!(allocations(), before, "{system}: next_bin allocated");
        assert_eq!(rig.bins_done(), 501);
    }
}

#[test]
fn configs_and_names_are_validated() {
    assert!(SimRig::new(&cfg(System::Lorenz, 0, 1, 1)).unwrap_err().contains("at least 1 neuron"));
    assert!(simulate(&SimConfig { dt: -1.0, ..cfg(System::Rossler, 2, 1, 1) }, 5).unwrap_err().contains("dt"));
    let e = "henon".parse::<System>().unwrap_err();
    assert!(e.contains("'henon'") && e.contains("lorenz, arneodo, rossler, linear"), "{e}");
    assert_eq!("rossler".parse::<System>(), Ok(System::Rossler));
    assert_eq!(System::Arneodo.to_string(), "arneodo");
    let rig = SimRig::new(&cfg(System::Linear, 6, 1, 1)).unwrap();
    assert_eq!((rig.channels(), rig.latent_dims(), rig.behavior_dims()), (6, 4, 2));
    // No behaviour requested: the dataset has none.
    let mut c = cfg(System::Lorenz, 2, 1, 1);
    c.behavior_dims = 0;
    assert_eq!(simulate(&c, 10).unwrap().behavior, None);
}

/// The drifting rig: before the step nothing differs from the plain rig; after it the dead
/// channels are silent, the swapped ones trade rates, the turned tuning changes the other
/// rates, and the behaviour (what the subject intends) is the plain rig's throughout.
#[test]
fn a_drifting_rig_changes_the_neurons_not_the_behaviour() {
    let mut plain = cfg(System::Lorenz, 12, 1, 3);
    plain.dt = 0.02;
    let mut drifting = plain.clone();
    drifting.drift = latentloop::sim::Drift {
        drift_degrees_per_minute: 0.0,
        step_at_seconds: Some(1.0),
        step_rotate_degrees: 45.0,
        step_dead_channels: 2,
        step_swap_channels: 3,
    };
    let (a, b) = (simulate(&plain, 100).unwrap(), simulate(&drifting, 100).unwrap());
    let (ra, rb) = (a.rates.as_ref().unwrap(), b.rates.as_ref().unwrap());
    assert_eq!(a.behavior, b.behavior);
    assert_eq!(a.latents, b.latents);
    for t in 0..50 {
        assert_eq!(ra.row(t), rb.row(t), "bin {t}: before the step");
    }
    for t in 50..100 {
        assert_eq!(&rb.row(t)[..2], &[0.0, 0.0], "dead channels, bin {t}");
        assert!(b.spikes.row(t)[..2].iter().all(|&s| s == 0.0));
        assert_ne!(ra.row(t)[6..], rb.row(t)[6..], "the turned tuning, bin {t}");
    }
    drifting.drift.step_dead_channels = 13;
    assert!(simulate(&drifting, 1).unwrap_err().contains("needs more than 12 channels"));
}
