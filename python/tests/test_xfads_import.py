"""`python -m latentloop import-xfads` on checkpoints that the reference xfads code wrote
(tests/fixtures/xfads, see its README.md), on variants of them built here, and on files
made to break the reader: what it writes (only the mapped tensors, equal to what torch
saved, and the metadata), and every refusal, by its message."""

import json
import math
import pickle
import struct
import zipfile

import numpy as np
import pytest

from conftest import REPO, run_cli
from latentloop import cli
from latentloop.safetensors_file import write_safetensors
from latentloop.torch_file import TorchFileError, load_torch
from latentloop.xfads_import import XfadsImportError, load_checkpoint

FIX = REPO / "tests" / "fixtures" / "xfads"
DT = 0.02
COMMON = ["dynamics_mod.log_Q", "initial_c_pdf.m_0", "initial_c_pdf.log_Q_0", "local_encoder.mlp.0.weight",
          "local_encoder.mlp.0.bias", "local_encoder.mlp.3.weight", "local_encoder.mlp.3.bias",
          "likelihood_pdf.readout_fn.1.weight", "likelihood_pdf.readout_fn.1.bias"]
GRU = ["dynamics_mod.mean_fn." + n for n in ("z_to_h.weight", "z_to_h.bias", "gru_cell.weight_ih",
                                             "gru_cell.weight_hh", "gru_cell.bias_ih", "gru_cell.bias_hh",
                                             "h_to_z.weight", "h_to_z.bias")]
MAPPED = {"gru": COMMON + GRU, "gru_rmsnorm": COMMON + GRU,
          "linear": COMMON + ["dynamics_mod.mean_fn.A.weight"], "diffusion": COMMON}
RMSNORM = {"gru": "false", "gru_rmsnorm": "true", "linear": "false", "diffusion": "false"}
DYNAMICS = {"gru": "gru", "gru_rmsnorm": "gru", "linear": "linear", "diffusion": "diffusion"}
LIGHTNING = FIX / "lightning" / "monkey_reaching_style.ckpt"
SEVERAL = "several models in the checkpoint: 'ssm.', 'best_ssm_enc.', 'best_ssm_prd.'; choose one with --prefix"


# --- helpers -------------------------------------------------------------------------------

def read_st(path):
    """A safetensors file read here with struct and json (not latentloop's reader):
    (tensors, metadata, header length, header bytes)."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8:8 + n]
    header = json.loads(raw)
    meta = header.pop("__metadata__", {})
    kinds = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8"}
    body = data[8 + n:]
    out = {}
    for k, v in header.items():
        b, e = v["data_offsets"]
        out[k] = np.frombuffer(body[b:e], dtype=kinds[v["dtype"]]).reshape(v["shape"])
    return out, meta, n, raw, header


def torch_saved(model):
    """The state dict as torch's safetensors wrote it (state_dict.safetensors)."""
    return read_st(FIX / model / "state_dict.safetensors")[0]


def run(capsys, *args):
    """import-xfads in this process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(["import-xfads", *map(str, args)])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *args):
    """The one `error:` line (exit status 2) of a refused import."""
    rc, out, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, out, err)
    return lines[0][len("error: "):]


def variant(tmp_path, name, model="gru", drop=(), add=None, change=None, metadata=None):
    """A .safetensors state dict: the fixture's, less `drop`, plus `add`, values changed by `change`."""
    sd = dict(torch_saved(model))
    for k in drop:
        del sd[k]
    sd.update(add or {})
    for k, f in (change or {}).items():
        sd[k] = f(sd[k])
    p = tmp_path / f"{name}.safetensors"
    write_safetensors(p, sd, metadata)
    return p


def ok_args(model, out):
    return ["--dt", DT, "--likelihood", "poisson", "--rmsnorm", RMSNORM[model], "--out", out]


# --- what it writes --------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["gru", "gru_rmsnorm", "linear", "diffusion"])
@pytest.mark.parametrize("source", ["state_dict.pt", "state_dict.safetensors"])
@pytest.mark.parametrize("prefix", [None, ""])
def test_converts_each_fixture(capsys, tmp_path, model, source, prefix):
    out = tmp_path / "m.safetensors"
    args = [FIX / model / source, *ok_args(model, out)] + ([] if prefix is None else ["--prefix", prefix])
    rc, stdout, err = run(capsys, *args)
    assert rc == 0, err
    assert stdout.startswith(f"wrote {out}: xfads ") and f"; {len(MAPPED[model])} tensors" in stdout
    tensors, meta, n, raw, header = read_st(out)
    assert sorted(tensors) == sorted(MAPPED[model])
    ref = torch_saved(model)
    for k, v in tensors.items():
        assert v.dtype == ref[k].dtype and v.shape == ref[k].shape and np.array_equal(v, ref[k]), k
    assert meta == {"dt": "0.02", "rmsnorm": RMSNORM[model], "likelihood": "poisson", "dynamics": DYNAMICS[model],
                    "samples": "32", "xfads_prefix": ""}
    assert "note: dropped backward_encoder.* (6 tensors)" in err and "note: dropped nl_filter.* (" in err


def test_file_format(capsys, tmp_path):
    """The safetensors layout, written here without the safetensors package; twice the same bytes."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out in (a, b):
        assert run(capsys, FIX / "gru" / "state_dict.pt", *ok_args("gru", out))[0] == 0
    assert a.read_bytes() == b.read_bytes()
    tensors, meta, n, raw, header = read_st(a)
    assert n % 8 == 0 and raw.rstrip(b" ").endswith(b"}") and set(raw[len(raw.rstrip(b" ")):]) <= {32}
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    assert spans[-1][1] == len(a.read_bytes()) - 8 - n
    assert list(header) == sorted(header)  # name order, like the Rust writer
    assert header["dynamics_mod.mean_fn.gru_cell.weight_ih"]["shape"] == [24, 0]
    assert all(v["dtype"] == "F32" for v in header.values())
    assert tensors["dynamics_mod.log_Q"].tobytes() == torch_saved("gru")["dynamics_mod.log_Q"].astype("<f4").tobytes()


def test_save_model_safetensors_and_its_metadata(capsys, tmp_path):
    """safetensors.torch.save_model's file (shared copies removed but for one empty tensor); its own
    metadata gives dt, rmsnorm and likelihood, and a flag that disagrees is refused."""
    out = tmp_path / "m.safetensors"
    rc, stdout, err = run(capsys, FIX / "gru" / "model.safetensors", "--out", out)
    assert rc == 0, err
    assert "note: dt 0.02 from the file's metadata" in err and "note: rmsnorm false from the file's metadata" in err
    tensors, meta, *_ = read_st(out)
    assert sorted(tensors) == sorted(MAPPED["gru"]) and meta["rmsnorm"] == "false" and meta["dt"] == "0.02"
    ref = torch_saved("gru")
    assert all(np.array_equal(v, ref[k]) for k, v in tensors.items())
    assert refused(capsys, FIX / "gru" / "model.safetensors", "--rmsnorm", "true", "--out", out) == \
        "--rmsnorm true, but the file's metadata says rmsnorm = 'false'"
    assert refused(capsys, FIX / "gru" / "model.safetensors", "--dt", "0.01", "--out", out) == \
        "--dt 0.01, but the file's metadata says dt = '0.02'"


def test_lightning_checkpoint_needs_a_prefix(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    assert refused(capsys, LIGHTNING, *ok_args("gru_rmsnorm", out)).startswith(SEVERAL)
    assert not out.exists()
    ref = torch_saved("gru_rmsnorm")
    rc, stdout, err = run(capsys, LIGHTNING, *ok_args("gru_rmsnorm", out), "--prefix", "ssm.")
    assert rc == 0, err
    assert "note: took the model under prefix 'ssm.'" in err
    assert "note: left out the other models in the Lightning checkpoint: 'best_ssm_enc.', 'best_ssm_prd.'" in err
    tensors, meta, *_ = read_st(out)
    assert sorted(tensors) == sorted(MAPPED["gru_rmsnorm"])
    assert all(np.array_equal(v, ref[k]) and v.dtype == ref[k].dtype for k, v in tensors.items())
    assert meta == {"dt": "0.02", "rmsnorm": "true", "likelihood": "poisson", "dynamics": "gru", "samples": "32",
                    "xfads_prefix": "ssm."}
    # The best-model copies differ (make_fixtures.py: enc log_Q + 0.1, m_0 + 1; prd + 0.2, + 2); "best_ssm_enc"
    # without its dot is the same prefix.
    for prefix, dq, dm in (("best_ssm_enc", 0.1, 1.0), ("best_ssm_prd.", 0.2, 2.0)):
        rc, _, err = run(capsys, LIGHTNING, *ok_args("gru_rmsnorm", out), "--prefix", prefix)
        assert rc == 0, err
        tensors, meta, *_ = read_st(out)
        assert meta["xfads_prefix"] == prefix.rstrip(".") + "."
        np.testing.assert_allclose(tensors["dynamics_mod.log_Q"], ref["dynamics_mod.log_Q"] + dq, rtol=0, atol=1e-6)
        np.testing.assert_allclose(tensors["initial_c_pdf.m_0"], ref["initial_c_pdf.m_0"] + dm, rtol=0, atol=1e-6)
        same = [k for k in tensors if k not in ("dynamics_mod.log_Q", "initial_c_pdf.m_0")]
        assert all(np.array_equal(tensors[k], ref[k]) for k in same)
    assert refused(capsys, LIGHTNING, *ok_args("gru_rmsnorm", out), "--prefix", "model.") == (
        f"{LIGHTNING}: no xfads model under --prefix 'model.'; the Lightning checkpoint has 'ssm.', "
        "'best_ssm_enc.', 'best_ssm_prd.'")


def test_the_whole_lightning_checkpoint_reads_as_torch_wrote_it():
    ck = load_torch(LIGHTNING)
    assert {"state_dict", "optimizer_states", "loops", "callbacks", "hyper_parameters"} <= set(ck)
    assert ck["hyper_parameters"] == {"n_time_bins_enc": 50, "bin_prd_start": 10, "is_svae": False,
                                      "use_input": False}
    assert len(ck["state_dict"]) == 102


def test_python_dash_m(tmp_path):
    out = tmp_path / "m.safetensors"
    r = run_cli("import-xfads", FIX / "linear" / "state_dict.pt", *ok_args("linear", out))
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {out}: xfads linear dynamics, 3 latents"), r.stderr
    r = run_cli("import-xfads", "--help")
    assert r.returncode == 0 and "usage: python -m latentloop import-xfads" in r.stdout and "--rmsnorm" in r.stdout


def test_options(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    rc, _, err = run(capsys, FIX / "linear" / "state_dict.pt", "--dt", "0.005", "--likelihood", "poisson",
                     "--rmsnorm", "true", "--samples", "64", "--out", out)
    assert rc == 0, err
    assert "note: rmsnorm false: xfads applies use_layer_norm only to GRU dynamics, and these are linear" in err
    meta = read_st(out)[1]
    assert meta["rmsnorm"] == "false" and meta["samples"] == "64" and meta["dt"] == "0.005"
    rc, _, err = run(capsys, FIX / "diffusion" / "state_dict.pt", "--dt", DT, "--likelihood", "poisson", "--out", out)
    assert rc == 0 and "note: dynamics diffusion: no mean_fn tensors" in err, err
    assert read_st(out)[1]["dynamics"] == "diffusion" and read_st(out)[1]["rmsnorm"] == "false"
    src = FIX / "gru" / "state_dict.pt"
    assert refused(capsys, src, *ok_args("gru", out), "--samples", "0") == "--samples must be at least 1, not 0"
    assert "argument --rmsnorm: invalid choice: 'yes'" in refused(capsys, src, "--dt", DT, "--rmsnorm", "yes",
                                                                   "--out", out)
    assert "the following arguments are required: --out" in refused(capsys, src, "--dt", DT)


# --- refusals --------------------------------------------------------------------------------

def test_refuses_an_input_network(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    src = FIX / "gru_input" / "state_dict.pt"
    assert refused(capsys, src, *ok_args("gru", out)) == (
        f"{src}: the model has an input network (nl_filter.input_latent_fn.linear.weight): its dynamics take "
        "external inputs u_t each bin, which latentloop's decoder does not feed; it cannot be imported")
    src = FIX / "bernoulli_gru_input" / "state_dict.safetensors"
    assert refused(capsys, src, "--out", out) == (
        f"{src}: the model has an input network (nl_filter.input_latent_fn.weight): its dynamics take external "
        "inputs u_t each bin, which latentloop's decoder does not feed; it cannot be imported")
    assert not out.exists()


def test_likelihood(capsys, tmp_path):
    """Poisson and Bernoulli have the same tensors: the flag is required; Gaussian shows itself."""
    out = tmp_path / "m.safetensors"
    assert refused(capsys, FIX / "gru" / "state_dict.pt", "--dt", DT, "--rmsnorm", "false", "--out", out) == (
        "--likelihood poisson or --likelihood bernoulli is required: the two have the same tensors (a masked "
        "linear readout), so the checkpoint cannot say which it was trained with")
    # The Bernoulli fixture without its input network.
    inputs = ["nl_filter.input_latent_fn.weight"]
    b = variant(tmp_path, "bernoulli", model="bernoulli_gru_input", drop=inputs)
    assert refused(capsys, b, "--dt", DT, "--rmsnorm", "false", "--out", out).startswith(
        "--likelihood poisson or --likelihood bernoulli is required")
    rc, _, err = run(capsys, b, "--dt", DT, "--rmsnorm", "false", "--likelihood", "bernoulli", "--out", out)
    assert rc == 0, err
    assert "note: likelihood bernoulli: latentloop's decoder reads poisson models, and refuses this file" in err
    tensors, meta, *_ = read_st(out)
    assert meta["likelihood"] == "bernoulli" and sorted(tensors) == sorted(MAPPED["gru"])
    # With the fixture's own metadata (likelihood = bernoulli), a contradicting flag is refused.
    b2 = variant(tmp_path, "bernoulli2", model="bernoulli_gru_input", drop=inputs,
                 metadata={"likelihood": "bernoulli", "dt": "0.02", "rmsnorm": "false"})
    assert refused(capsys, b2, "--likelihood", "poisson", "--out", out) == \
        "--likelihood poisson, but the file's metadata says likelihood = 'bernoulli'"
    # Gaussian: its noise variance is in the state dict (log_R, or R_diag when fixed).
    for name in ("log_R", "R_diag"):
        g = variant(tmp_path, "gauss", add={f"likelihood_pdf.{name}": np.full(10, 0.5, np.float32)})
        rc, _, err = run(capsys, g, "--dt", DT, "--rmsnorm", "false", "--out", out)
        assert rc == 0 and f"note: likelihood gaussian: the model has likelihood_pdf.{name}" in err, err
        tensors, meta, *_ = read_st(out)
        assert meta["likelihood"] == "gaussian" and f"likelihood_pdf.{name}" in tensors
        assert refused(capsys, g, "--dt", DT, "--rmsnorm", "false", "--likelihood", "poisson", "--out", out) == (
            f"{g}: --likelihood poisson, but the model has likelihood_pdf.{name}, the noise variance of a "
            "Gaussian likelihood")
    src = FIX / "gru" / "state_dict.pt"
    assert refused(capsys, src, "--dt", DT, "--rmsnorm", "false", "--likelihood", "gaussian", "--out", out) == (
        f"{src}: --likelihood gaussian, but the model has no likelihood_pdf.log_R or likelihood_pdf.R_diag (a "
        "Gaussian likelihood's noise)")
    g = variant(tmp_path, "gauss_bad", add={"likelihood_pdf.R_diag": np.zeros(10, np.float32)})
    assert refused(capsys, g, "--dt", DT, "--rmsnorm", "false", "--out", out) == \
        f"{g}: likelihood_pdf.R_diag has a value <= 0 (it is a variance)"


def test_refuses_a_gru_without_rmsnorm(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    assert refused(capsys, FIX / "gru_rmsnorm" / "state_dict.pt", "--dt", DT, "--likelihood", "poisson",
                   "--out", out) == (
        "--rmsnorm true or --rmsnorm false is required for a model with GRU dynamics: xfads's use_layer_norm (an "
        "RMSNorm of the GRU's output, without weights) leaves no trace in the checkpoint, and the dynamics differ "
        "with it")
    assert not out.exists()


@pytest.mark.parametrize("dt,says", [
    (None, "--dt is required: the bin width in seconds (xfads's cfg.bin_sz), which no checkpoint saves"),
    ("0", "--dt must be a positive number of seconds (xfads's cfg.bin_sz), not 0"),
    ("-0.02", "--dt must be a positive number of seconds (xfads's cfg.bin_sz), not -0.02"),
    ("nan", "--dt must be a positive number of seconds (xfads's cfg.bin_sz), not nan"),
    ("inf", "--dt must be a positive number of seconds (xfads's cfg.bin_sz), not inf"),
    ("20ms", "argument --dt: invalid float value: '20ms'"),
])
def test_refuses_a_missing_or_bad_dt(capsys, tmp_path, dt, says):
    args = [FIX / "linear" / "state_dict.pt", "--likelihood", "poisson", "--out", tmp_path / "m.safetensors"]
    msg = refused(capsys, *args, *([] if dt is None else ["--dt", dt]))
    assert msg.startswith(says), msg


def test_refuses_unknown_tensors(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    v = variant(tmp_path, "extra", add={"dynamics_mod.mean_fn.layer_norm.weight": np.ones(3, np.float32),
                                        "behavior_decoder.weight": np.ones((2, 3), np.float32)})
    assert refused(capsys, v, *ok_args("gru", out)) == (
        f"{v}: tensors that latentloop does not map: behavior_decoder.weight [2, 3], "
        "dynamics_mod.mean_fn.layer_norm.weight [3]; importing without them would decode with a different model (xfads "
        "models with GRU, linear or diffusion dynamics, the low-rank local encoder and a masked linear readout "
        "are mapped)")
    # Under a prefix, the names are given in full; a copy under nl_filter. of something unknown too.
    sd = {"ssm." + k: x for k, x in torch_saved("gru").items()}
    sd["ssm.nl_filter.dynamics_mod.mean_fn.extra"] = np.zeros(2, np.float32)
    p = tmp_path / "prefixed.safetensors"
    write_safetensors(p, sd)
    assert refused(capsys, p, *ok_args("gru", out)).startswith(
        f"{p}: tensors that latentloop does not map: ssm.nl_filter.dynamics_mod.mean_fn.extra [2];")
    assert not out.exists()


def test_refuses_models_it_cannot_map(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    v = variant(tmp_path, "noq0", drop=["initial_c_pdf.log_Q_0", "nl_filter.initial_c_pdf.log_Q_0"])
    assert refused(capsys, v, *ok_args("gru", out)) == (
        f"{v}: the model under prefix '' lacks initial_c_pdf.log_Q_0 (xfads leaves a fixed Q or Q_0, fix_Q / "
        "fix_Q_0, out of the state dict)")
    w = "dynamics_mod.mean_fn.gru_cell.weight_ih"
    v = variant(tmp_path, "input_gru", change={w: lambda a: np.ones((24, 2), np.float32),
                                               "nl_filter." + w: lambda a: np.ones((24, 2), np.float32)})
    assert refused(capsys, v, *ok_args("gru", out)) == (
        f"{v}: {w} has shape [24, 2], expected [24, 0]: the GRU cell takes an input, and latentloop's GRU dynamics "
        "have none")
    v = variant(tmp_path, "shape", change={"likelihood_pdf.readout_fn.1.weight": lambda a: a[:, :2].T.copy()})
    assert refused(capsys, v, *ok_args("gru", out)) == (
        f"{v}: likelihood_pdf.readout_fn.1.weight has shape [2, 10], expected [10, Lr] with 1 <= Lr <= 3 (10 "
        "neurons as the encoder reads)")
    v = variant(tmp_path, "both", add={"dynamics_mod.mean_fn.A.weight": np.eye(3, dtype=np.float32)})
    assert refused(capsys, v, *ok_args("gru", out)).endswith(
        "the model has both GRU (dynamics_mod.mean_fn.z_to_h.weight) and linear (dynamics_mod.mean_fn.A.weight) "
        "dynamics tensors")
    v = variant(tmp_path, "edited", change={"nl_filter.dynamics_mod.log_Q": lambda a: a + 1})
    assert refused(capsys, v, *ok_args("gru", out)).startswith(
        f"{v}: nl_filter.dynamics_mod.log_Q differs from dynamics_mod.log_Q; in xfads they are one module")
    v = variant(tmp_path, "nan", change={"local_encoder.mlp.0.bias": lambda a: np.where(np.arange(16) == 5, np.nan, a)
                                         .astype(np.float32)})
    assert refused(capsys, v, *ok_args("gru", out)) == \
        f"{v}: local_encoder.mlp.0.bias has a non-finite value (nan) at flat index 5"
    v = variant(tmp_path, "ints", change={"initial_c_pdf.m_0": lambda a: np.zeros(3, np.int64),
                                          "nl_filter.initial_c_pdf.m_0": lambda a: np.zeros(3, np.int64)})
    assert refused(capsys, v, *ok_args("gru", out)) == f"{v}: initial_c_pdf.m_0 holds int64 values, not floating point"
    p = tmp_path / "nothing.safetensors"
    write_safetensors(p, {"a.weight": np.ones(2, np.float32)})
    assert refused(capsys, p, *ok_args("gru", out)).startswith(
        f"{p}: no xfads model in the safetensors file: no tensor is named like 'dynamics_mod.log_Q'")
    assert not out.exists()


def test_copies_and_half_precision(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    # Only the nl_filter copy of log_Q: taken from it.
    v = variant(tmp_path, "copy_only", drop=["dynamics_mod.log_Q"])
    rc, _, err = run(capsys, v, *ok_args("gru", out))
    assert rc == 0 and "note: took dynamics_mod.log_Q from the nl_filter.* copies" in err, err
    assert np.array_equal(read_st(out)[0]["dynamics_mod.log_Q"], torch_saved("gru")["dynamics_mod.log_Q"])
    # float16 is widened to float32; float64 stays float64.
    v = variant(tmp_path, "half", change={"local_encoder.mlp.0.weight": lambda a: a.astype(np.float16),
                                          "likelihood_pdf.readout_fn.1.bias": lambda a: a.astype(np.float64)})
    rc, _, err = run(capsys, v, *ok_args("gru", out))
    assert rc == 0 and "note: widened 1 half-precision tensors to float32" in err, err
    t = read_st(out)[0]
    assert t["local_encoder.mlp.0.weight"].dtype == np.float32
    assert t["likelihood_pdf.readout_fn.1.bias"].dtype == np.float64


def test_refuses_to_overwrite_the_checkpoint(capsys, tmp_path):
    v = variant(tmp_path, "self")
    before = v.read_bytes()
    assert refused(capsys, v, *ok_args("gru", v)) == f"{v}: is the checkpoint itself; write the model elsewhere"
    assert v.read_bytes() == before


# --- the reader: torch files, bad files, pickles that would run code ------------------------

def test_torch_reader_on_files_torch_wrote():
    d = FIX / "torch_cases"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    v = load_torch(d / "views.pt")
    assert np.array_equal(v["t"], x.T) and np.array_equal(v["v"], x[1:, 2:]) and np.array_equal(v["base"], x)
    assert v["t"].flags.c_contiguous and v["scalar"].shape == () and v["scalar"] == 2.5
    assert v["empty"].shape == (24, 0) and v["empty"].dtype == np.float32
    t = load_torch(d / "dtypes.pt")
    assert t["bf16"].dtype == np.float32 and t["bf16"].tolist() == [1.5, -2.0, 3.25]
    assert t["f16"].dtype == np.float16 and t["f16"].tolist() == [[0.5, 1.0], [2.0, -4.0]]
    assert t["f64"].dtype == np.float64 and t["f64"].tolist() == [0.1, 0.2]
    assert t["i64"].tolist() == [1, -2, 3] and t["bool"].tolist() == [True, False]
    m = load_torch(d / "misc.pt")
    assert m["p"].tolist() == [0.0, 1.0, 2.0] and m["size"] == (2, 3)
    assert m["device"] == "cpu" and m["dtype"] == "float32"
    with pytest.raises(TorchFileError, match=r"refusing to unpickle torch\.nn\.modules\.linear\.Linear: .*state_dict"):
        load_torch(d / "module.pt")


def _torch_zip(path, pickle_bytes, extra=None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for k, v in (extra or {}).items():
            z.writestr(k, v)
    return path


def _payloads(marker):
    cmd = f"touch {marker}".encode()
    return {
        "os.system": b"cos\nsystem\n(S'" + cmd + b"'\ntR.",
        "posix.system": b"cposix\nsystem\n(S'" + cmd + b"'\ntR.",
        "builtins.eval": b"c__builtin__\neval\n(S'__import__(\"os\").system(\"" + cmd + b"\")'\ntR.",
        "subprocess.Popen": b"\x80\x04\x8c\nsubprocess\x8c\x05Popen\x93](\x8c\x05touch\x8c"
                            + bytes([len(str(marker))]) + str(marker).encode() + b"e\x85R.",
        # INST opcode: find_class too
        "os.system (INST)": b"(S'" + cmd + b"'\nios\nsystem\n.",
        # inside a plausible state dict, after a real tensor
        "os.system (in a dict)": b"\x80\x02}q\x00(X\x01\x00\x00\x00acos\nsystem\nq\x01X"
                                 + struct.pack("<I", len(cmd)) + cmd + b"\x85q\x02Rq\x03u.",
    }


@pytest.mark.parametrize("name", list(_payloads("x")))
def test_a_malicious_pickle_is_refused_without_running(capsys, tmp_path, name):
    marker = tmp_path / "ran"
    payload = _payloads(marker)[name]
    p = _torch_zip(tmp_path / "evil.pt", payload)
    glob = name.split(" ")[0]
    with pytest.raises(TorchFileError, match=f"refusing to unpickle {glob.replace('.', '[.]')}:"):
        load_torch(p)
    msg = refused(capsys, p, "--dt", DT, "--out", tmp_path / "m.safetensors")
    assert msg.startswith(f"{p}: refusing to unpickle {glob}: this reader takes tensors and plain containers only")
    assert "nothing in it was run here" in msg
    assert not marker.exists()
    # The same bytes as a bare pickle are not unpickled at all.
    bare = tmp_path / "evil_bare.pt"
    bare.write_bytes(b"\x80\x02" + payload if not payload.startswith(b"\x80") else payload)
    assert "a bare pickle, not a torch.save zip archive" in refused(capsys, bare, "--dt", DT, "--out",
                                                                    tmp_path / "m.safetensors")
    assert not marker.exists()


def test_set_state_is_refused_but_on_an_ordered_dict(tmp_path):
    # torch.Size((1,)) then BUILD with a dict: refused
    p = _torch_zip(tmp_path / "build.pt", b"\x80\x02ctorch\nSize\n]K\x01a\x85R}b.")
    with pytest.raises(TorchFileError, match="refusing to set the state of a tuple"):
        load_torch(p)
    p = _torch_zip(tmp_path / "od.pt", b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb.")
    assert load_torch(p) == {}


def test_bad_files_are_named(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    opts = ["--dt", DT, "--out", out]
    src = (FIX / "gru" / "state_dict.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(src[: len(src) // 2])
    assert refused(capsys, cut, *opts).startswith(f"{cut}: not a readable zip archive")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"hello world, not a model at all")
    assert refused(capsys, junk, *opts).startswith(f"{junk}: not a safetensors file (header length ")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "not a safetensors file (0 bytes" in refused(capsys, empty, *opts)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    assert refused(capsys, legacy, *opts).startswith(f"{legacy}: written in torch's legacy format")
    ts = _torch_zip(tmp_path / "script.pt", b"\x80\x02}.", {"archive/constants.pkl": b"", "archive/code/x.py": b""})
    assert refused(capsys, ts, *opts).startswith(f"{ts}: a TorchScript archive (torch.jit.save)")
    # A storage shorter than the tensors on it say.
    with zipfile.ZipFile(FIX / "torch_cases" / "views.pt") as z:
        members = {n: z.read(n) for n in z.namelist()}
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(short, "w") as z:
        for n, b in members.items():
            z.writestr(n, b[:8] if n.endswith("/data/0") else b)
    with pytest.raises(TorchFileError, match=r"storage 0 holds 8 bytes, 48 needed for 12 values of FloatStorage"):
        load_torch(short)
    # A stride that reaches past the storage.
    evil = _torch_zip(tmp_path / "stride.pt",
                      b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
                      b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ"
                      b"K\x00K\x02\x85K\x05\x85\x89ccollections\nOrderedDict\n)RtR.",
                      {"archive/data/0": struct.pack("<2f", 1, 2)})
    with pytest.raises(TorchFileError, match=r"reads element 5 of storage 0, which holds 2"):
        load_torch(evil)
    st = tmp_path / "bad.safetensors"
    st.write_bytes(struct.pack("<Q", 2) + b"{}" + b"")
    assert refused(capsys, st, *opts).startswith(f"{st}: no xfads model in the safetensors file")
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    st.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    assert "data_offsets [0, 16] do not hold 4 F32 values within the 8 data bytes" in refused(capsys, st, *opts)


def test_load_checkpoint_kinds(tmp_path):
    assert load_checkpoint(LIGHTNING).kind == "Lightning checkpoint"
    assert load_checkpoint(FIX / "gru" / "state_dict.pt").kind == "state dict"
    assert load_checkpoint(FIX / "gru" / "state_dict.safetensors").kind == "safetensors file"
    p = _torch_zip(tmp_path / "plain.pt", pickle.dumps({"epoch": 3, "note": "no tensors"}, protocol=2))
    with pytest.raises(XfadsImportError, match=r"holds a dict without tensors or a 'state_dict' \(its keys: 'epoch', "):
        load_checkpoint(p)
    p = _torch_zip(tmp_path / "list.pt", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(XfadsImportError, match="holds a list, not a state dict or a checkpoint"):
        load_checkpoint(p)


# --- the converted model reproduces the reference's deterministic outputs -------------------

def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _mean_fn(t, z, dynamics, rms):
    if dynamics == "diffusion":
        return z
    if dynamics == "linear":
        return z @ t["dynamics_mod.mean_fn.A.weight"].T
    g = lambda n: t["dynamics_mod.mean_fn." + n].astype(np.float64)  # noqa: E731
    h = z @ g("z_to_h.weight").T + g("z_to_h.bias")
    H = h.shape[-1]
    gx = g("gru_cell.bias_ih")                       # the cell has no input: W_ih x = 0
    gh = h @ g("gru_cell.weight_hh").T + g("gru_cell.bias_hh")
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    r, u = sig(gx[:H] + gh[..., :H]), sig(gx[H:2 * H] + gh[..., H:2 * H])
    n = np.tanh(gx[2 * H:] + r * gh[..., 2 * H:])
    out = ((1 - u) * n + u * h) @ g("h_to_z.weight").T + g("h_to_z.bias")
    if rms:
        out = out / np.sqrt((out ** 2).mean(-1, keepdims=True) + 1e-5)
    return out


@pytest.mark.parametrize("model", ["gru", "gru_rmsnorm", "linear", "diffusion"])
def test_the_converted_model_gives_the_reference_outputs(capsys, tmp_path, model):
    """With numpy, from the written file: the dynamics' mean, the local encoder, the readout's log rate
    and the first bin's filtered mean (closed form) equal what xfads computed (reference.safetensors)."""
    out = tmp_path / "m.safetensors"
    assert run(capsys, FIX / model / "state_dict.pt", *ok_args(model, out))[0] == 0
    t, meta, *_ = read_st(out)
    ref, rmeta, *_ = read_st(FIX / model / "reference.safetensors")
    assert (rmeta["dt"], rmeta["rmsnorm"], rmeta["dynamics_type"]) == (meta["dt"], meta["rmsnorm"], meta["dynamics"])
    rms = meta["rmsnorm"] == "true"
    z = ref["probe_z"].astype(np.float64)
    np.testing.assert_allclose(_mean_fn(t, z, meta["dynamics"], rms), ref["probe_mean_fn"], atol=2e-6, rtol=0)
    if meta["dynamics"] == "gru":  # the flag matters: the other choice is far off
        assert np.abs(_mean_fn(t, z, "gru", not rms) - ref["probe_mean_fn"]).max() > 1e-2
    f = lambda k: t[k].astype(np.float64)  # noqa: E731
    y = ref["y"].astype(np.float64)
    a = y @ f("local_encoder.mlp.0.weight").T + f("local_encoder.mlp.0.bias")
    enc = (a / (1 + np.exp(-a))) @ f("local_encoder.mlp.3.weight").T + f("local_encoder.mlp.3.bias")  # SiLU
    np.testing.assert_allclose(enc, ref["enc_out"], atol=2e-5, rtol=0)
    Lr = t["likelihood_pdf.readout_fn.1.weight"].shape[1]
    rate = math.log(float(meta["dt"])) + z[:, :Lr] @ f("likelihood_pdf.readout_fn.1.weight").T + \
        f("likelihood_pdf.readout_fn.1.bias")
    np.testing.assert_allclose(rate, ref["probe_log_rate_per_bin"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(_softplus(f("dynamics_mod.log_Q")), ref["Q_diag"], rtol=1e-6)
    # First bin: J = Q0^-1 + K K^T, m_f0 = J^-1 (Q0^-1 m_0 + k) with k = enc[0, :L], K = enc[0, L:] as L x r.
    L = t["dynamics_mod.log_Q"].shape[0]
    q0 = _softplus(f("initial_c_pdf.log_Q_0"))
    k, K = enc[0, :L], enc[0, L:].reshape(L, -1)
    m_f0 = np.linalg.solve(np.diag(1 / q0) + K @ K.T, f("initial_c_pdf.m_0") / q0 + k)
    np.testing.assert_allclose(m_f0, ref["m_f0"], atol=1e-5, rtol=0)
    assert ref["m_f_S1000_mean"].shape == ref["m_f_S1000_std"].shape == (int(rmeta["T"]), L)
    if "exact_m_f" in ref:
        np.testing.assert_allclose(ref["exact_m_f"][0], ref["m_f0"], atol=1e-6)


def test_output_path_problems_name_the_path(capsys, tmp_path):
    src = FIX / "linear" / "state_dict.pt"
    opts = ["--dt", DT, "--likelihood", "poisson"]
    assert refused(capsys, src, *opts, "--out", tmp_path / "no" / "m.safetensors") == \
        f"{tmp_path / 'no' / 'm.safetensors'}: No such file or directory"
    assert refused(capsys, src, *opts, "--out", tmp_path) == f"{tmp_path}: is a folder, not a file name"
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_a_model_with_and_without_a_prefix(capsys, tmp_path):
    sd = torch_saved("linear")
    p = tmp_path / "two.safetensors"
    write_safetensors(p, {**sd, **{"ssm." + k: v + 1 for k, v in sd.items()}})
    out = tmp_path / "m.safetensors"
    assert refused(capsys, p, *ok_args("linear", out)) == \
        "several models in the checkpoint: '', 'ssm.'; choose one with --prefix"
    for prefix, d in (("", 0), ("ssm.", 1)):
        rc, _, err = run(capsys, p, *ok_args("linear", out), "--prefix", prefix)
        assert rc == 0, err
        t = read_st(out)[0]
        assert sorted(t) == sorted(MAPPED["linear"]) and all(np.array_equal(v, sd[k] + d) for k, v in t.items())
