"""Turn a catniplab/xfads checkpoint into a latentloop model file (`python -m latentloop import-xfads`).

Reads a PyTorch Lightning .ckpt, a torch.save'd state_dict (.pt) or a .safetensors state dict
with numpy alone (latentloop.torch_file never runs what a pickle names), picks one model in
it by its key prefix, and writes a .safetensors file holding only the tensors latentloop's
decoder maps, under their xfads names with the prefix removed, plus the metadata that the
weights cannot give: dt, rmsnorm, likelihood, dynamics, samples and xfads_prefix.

What an xfads state dict holds (the names are xfads's modules):

| names (after the prefix) | what | here |
| --- | --- | --- |
| dynamics_mod.log_Q | softplus -> process noise Q (L) | kept |
| dynamics_mod.mean_fn.{z_to_h, gru_cell, h_to_z}.* | GRU dynamics (gru_cell.weight_ih is 3H x 0) | kept |
| dynamics_mod.mean_fn.A.weight | linear dynamics z -> A z | kept |
| (no mean_fn tensors) | diffusion: identity mean (DynamicsEye) | dynamics = diffusion |
| initial_c_pdf.{m_0, log_Q_0} | the first bin's prior | kept |
| local_encoder.mlp.{0,3}.{weight,bias} | the local encoder (N -> H -> (r+1) L) | kept |
| likelihood_pdf.readout_fn.1.{weight,bias} | readout after the latent mask z[:Lr] | kept |
| likelihood_pdf.log_R or R_diag | a Gaussian likelihood's noise | kept, likelihood = gaussian |
| backward_encoder.* | the smoother's backward pass (reads future bins) | dropped |
| nl_filter.{dynamics_mod, initial_c_pdf}.* | the filter's references to the same modules | dropped (checked equal) |
| nl_filter.input_latent_fn.* | an input network (external inputs u) | refused |

Anything else under the prefix is refused by name: it would be a part of the model that the
decoder would silently leave out.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import numpy as np

from .safetensors_file import SafetensorsError, TensorFile, parse_safetensors, write_safetensors
from .torch_file import TorchFileError, load_torch

GRU = tuple("dynamics_mod.mean_fn." + n for n in (
    "z_to_h.weight", "z_to_h.bias", "gru_cell.weight_ih", "gru_cell.weight_hh", "gru_cell.bias_ih",
    "gru_cell.bias_hh", "h_to_z.weight", "h_to_z.bias"))
GRU_OPTIONAL = ("dynamics_mod.mean_fn.gru_cell.weight_ih",)
LINEAR = ("dynamics_mod.mean_fn.A.weight",)
COMMON = ("dynamics_mod.log_Q", "initial_c_pdf.m_0", "initial_c_pdf.log_Q_0",
          "local_encoder.mlp.0.weight", "local_encoder.mlp.0.bias",
          "local_encoder.mlp.3.weight", "local_encoder.mlp.3.bias",
          "likelihood_pdf.readout_fn.1.weight", "likelihood_pdf.readout_fn.1.bias")
GAUSSIAN = ("likelihood_pdf.log_R", "likelihood_pdf.R_diag")
KNOWN = frozenset(GRU + LINEAR + COMMON + GAUSSIAN)
# Names that mark a model's root: the prefix is what comes before them.
ANCHORS = ("dynamics_mod.log_Q", "initial_c_pdf.m_0", "local_encoder.mlp.0.weight",
           "likelihood_pdf.readout_fn.1.weight")
LIKELIHOODS = ("poisson", "bernoulli", "gaussian")
DYNAMICS = ("gru", "linear", "diffusion")


class XfadsImportError(ValueError):
    """A checkpoint that cannot be converted, or options that do not fit it: one sentence."""


class Checkpoint:
    """The tensors of a checkpoint file: `tensors` (name -> numpy array, file order), `metadata`
    (a safetensors file's __metadata__; empty for torch files) and `kind` (for messages)."""

    def __init__(self, path, tensors, metadata, kind):
        self.path, self.tensors, self.metadata, self.kind = str(path), tensors, metadata, kind


def _quote(names):
    return ", ".join(repr(n) for n in names)


def load_checkpoint(path) -> Checkpoint:
    """Read a Lightning .ckpt, a torch.save'd state dict or a .safetensors file."""
    where = str(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        try:
            obj = load_torch(path)
        except TorchFileError as e:
            raise XfadsImportError(str(e)) from None
        return _from_torch(obj, where)
    try:
        with open(path, "rb") as f:
            tf: TensorFile = parse_safetensors(f.read(), where)
    except SafetensorsError as e:
        raise XfadsImportError(f"{e} (the file is neither a torch.save file, a zip archive, nor a readable "
                               "safetensors file)") from None
    return Checkpoint(path, OrderedDict(tf.tensors), tf.metadata, "safetensors file")


def _from_torch(obj, where):
    if not isinstance(obj, dict):
        raise XfadsImportError(f"{where}: holds a {type(obj).__name__}, not a state dict or a checkpoint")
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        kind = "Lightning checkpoint" if "pytorch-lightning_version" in obj else "checkpoint"
    elif any(isinstance(v, np.ndarray) for v in obj.values()):
        sd, kind = obj, "state dict"
    else:
        keys = ", ".join(repr(k) for k in list(obj)[:12])
        raise XfadsImportError(f"{where}: holds a dict without tensors or a 'state_dict' (its keys: {keys})")
    tensors = OrderedDict((k, v) for k, v in sd.items() if isinstance(k, str) and isinstance(v, np.ndarray))
    if not tensors:
        raise XfadsImportError(f"{where}: its state dict holds no tensors")
    return Checkpoint(where, tensors, {}, kind)


def candidate_prefixes(names):
    """The prefixes under which the names hold an xfads model, in file order."""
    out = []
    for k in names:
        for a in ANCHORS:
            if k.endswith(a):
                p = k[: -len(a)]
                if p.endswith("nl_filter."):
                    p = p[: -len("nl_filter.")]
                if (p == "" or p.endswith(".")) and p not in out:
                    out.append(p)
    return out


def choose_prefix(ck: Checkpoint, prefix=None):
    cands = candidate_prefixes(ck.tensors)
    shown = _quote(cands)
    if prefix is not None:
        want = prefix if prefix == "" or prefix.endswith(".") else prefix + "."
        if want not in cands:
            has = f"the {ck.kind} has {shown}" if cands else f"the {ck.kind} holds no xfads model"
            raise XfadsImportError(f"{ck.path}: no xfads model under --prefix {prefix!r}; {has}")
        return want, cands
    if not cands:
        some = ", ".join(list(ck.tensors)[:6])
        raise XfadsImportError(f"{ck.path}: no xfads model in the {ck.kind}: no tensor is named like "
                               f"'dynamics_mod.log_Q' or 'local_encoder.mlp.0.weight' ({len(ck.tensors)} "
                               f"tensors: {some}{', ...' if len(ck.tensors) > 6 else ''})")
    if len(cands) > 1:
        hint = ""
        if {"best_ssm_enc.", "best_ssm_prd."} & set(cands):
            hint = (" (xfads's Lightning trainers save 'ssm.', the model as last trained, and 'best_ssm_enc.' / "
                    "'best_ssm_prd.', copies kept at the best validation R2 of decoding / forecasting)")
        raise XfadsImportError(f"several models in the checkpoint: {shown}; choose one with --prefix{hint}")
    return cands[0], cands


class Imported:
    """The converted model: `tensors` and `metadata` to write, `notes` (what was taken, dropped and why),
    `summary` (one line)."""

    def __init__(self, tensors, metadata, notes, summary):
        self.tensors, self.metadata, self.notes, self.summary = tensors, metadata, notes, summary


def _parse_bool(v, what):
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise XfadsImportError(f"{what} must be true or false, not {v!r}")


def _from_file_meta(flag, meta, key, parse, flag_name):
    """The option's value: the flag, else the input file's metadata; both given must agree."""
    have = meta.get(key)
    if have is None:
        return flag, None
    file_value = parse(have, f"the file's metadata {key!r}")
    if flag is not None and flag != file_value:
        shown = str(flag).lower() if isinstance(flag, bool) else flag
        raise XfadsImportError(f"{flag_name} {shown}, but the file's metadata says {key} = {have!r}")
    return file_value, "the file's metadata"


def _dt(v, what):
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise XfadsImportError(f"{what} must be a number of seconds, not {v!r}") from None
    return x


def _samples(v, what):
    try:
        x = int(str(v).strip())
    except ValueError:
        raise XfadsImportError(f"{what} must be a whole number, not {v!r}") from None
    return x


def _likelihood(v, what):
    s = str(v).strip().lower()
    if s not in LIKELIHOODS:
        raise XfadsImportError(f"{what} must be one of {', '.join(LIKELIHOODS)}, not {v!r}")
    return s


def convert(ck: Checkpoint, dt=None, rmsnorm=None, likelihood=None, samples=None, prefix=None) -> Imported:
    """Check the chosen model and build what import-xfads writes. Raises XfadsImportError."""
    p, cands = choose_prefix(ck, prefix)
    notes = []
    others = [c for c in cands if c != p]
    ck_name = ck.path
    notes.append(f"took the model under prefix {p!r}" if p else "took the model (its names have no prefix)")

    # The names under p, leaving out those of another model whose prefix extends p.
    mine = OrderedDict()
    outside = []
    for k, v in ck.tensors.items():
        if k.startswith(p) and not any(c != p and c.startswith(p) and k.startswith(c) for c in cands):
            mine[k[len(p):]] = v
        else:
            outside.append(k)
    if others:
        notes.append(f"left out the other models in the {ck.kind}: {_quote(others)}")
    strays = [k for k in outside if not any(k.startswith(c) for c in others)]
    if strays:
        notes.append(f"left out {len(strays)} tensors outside any model: {', '.join(strays[:8])}"
                     f"{', ...' if len(strays) > 8 else ''}")

    inputs = [k for k in mine if "input_latent_fn" in k]
    if inputs:
        raise XfadsImportError(
            f"{ck_name}: the model has an input network ({', '.join(p + k for k in inputs)}): its dynamics take "
            "external inputs u_t each bin, which latentloop's decoder does not feed; it cannot be imported")

    rel = OrderedDict()
    backward, copies, unknown, from_copy = [], [], [], []
    for k, v in mine.items():
        if k.startswith("backward_encoder."):
            backward.append(k)
        elif k.startswith("nl_filter."):
            copies.append(k)
        elif k in KNOWN:
            rel[k] = v
        else:
            unknown.append(k)
    for k in copies:
        base = k[len("nl_filter."):]
        if base not in KNOWN or not base.startswith(("dynamics_mod.", "initial_c_pdf.")):
            unknown.append(k)
        elif base in rel:
            a, b = rel[base], mine[k]
            if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
                raise XfadsImportError(f"{ck_name}: {p}{k} differs from {p}{base}; in xfads they are one module "
                                       "(the filter's reference to the model's), so this checkpoint was edited or "
                                       "is not an xfads model: which of them the filter used cannot be told")
        else:
            rel[base] = mine[k]
            from_copy.append(base)
    if unknown:
        listed = ", ".join(f"{p}{k} {list(mine[k].shape)}" for k in unknown)
        raise XfadsImportError(
            f"{ck_name}: tensors that latentloop does not map: {listed}; importing without them would decode "
            "with a different model (xfads models with GRU, linear or diffusion dynamics, the low-rank local "
            "encoder and a masked linear readout are mapped)")
    if backward:
        notes.append(f"dropped backward_encoder.* ({len(backward)} tensors): the smoother's backward pass "
                     "reads future bins, which a causal decoder has not got")
    dropped_copies = [k for k in copies if k[len("nl_filter."):] not in from_copy]
    if dropped_copies:
        notes.append(f"dropped nl_filter.* ({len(dropped_copies)} tensors): the filter's references to "
                     "dynamics_mod / initial_c_pdf, equal to them")
    if from_copy:
        notes.append(f"took {', '.join(from_copy)} from the nl_filter.* copies (the file has no other)")

    # Dynamics.
    has_gru = [k for k in GRU if k in rel]
    has_lin = [k for k in LINEAR if k in rel]
    if has_gru and has_lin:
        raise XfadsImportError(f"{ck_name}: the model has both GRU ({has_gru[0]}) and linear ({has_lin[0]}) "
                               "dynamics tensors")
    dynamics = "gru" if has_gru else "linear" if has_lin else "diffusion"
    need = list(COMMON) + ([k for k in GRU if k not in GRU_OPTIONAL] if dynamics == "gru" else
                           list(LINEAR) if dynamics == "linear" else [])
    missing = [k for k in need if k not in rel]
    if missing:
        hint = ""
        if any(k in missing for k in ("dynamics_mod.log_Q", "initial_c_pdf.log_Q_0")):
            hint = " (xfads leaves a fixed Q or Q_0, fix_Q / fix_Q_0, out of the state dict)"
        raise XfadsImportError(f"{ck_name}: the model under prefix {p!r} lacks {', '.join(p + k for k in missing)}"
                               f"{hint}")

    # Shapes.
    def shape(k):
        return tuple(rel[k].shape)

    def expect(k, want, why=""):
        if shape(k) != tuple(want):
            raise XfadsImportError(f"{ck_name}: {p}{k} has shape {list(shape(k))}, expected {list(want)}{why}")

    if len(shape("dynamics_mod.log_Q")) != 1 or shape("dynamics_mod.log_Q")[0] < 1:
        raise XfadsImportError(f"{ck_name}: {p}dynamics_mod.log_Q has shape {list(shape('dynamics_mod.log_Q'))}, "
                               "expected [L]")
    L = shape("dynamics_mod.log_Q")[0]
    expect("initial_c_pdf.m_0", (L,))
    expect("initial_c_pdf.log_Q_0", (L,))
    hidden = 0
    if dynamics == "gru":
        whh = shape("dynamics_mod.mean_fn.gru_cell.weight_hh")
        if len(whh) != 2 or whh[0] != 3 * whh[1] or whh[1] < 1:
            raise XfadsImportError(f"{ck_name}: {p}dynamics_mod.mean_fn.gru_cell.weight_hh has shape {list(whh)}, "
                                   "expected [3H, H]")
        H = hidden = whh[1]
        if "dynamics_mod.mean_fn.gru_cell.weight_ih" in rel:
            expect("dynamics_mod.mean_fn.gru_cell.weight_ih", (3 * H, 0),
                   ": the GRU cell takes an input, and latentloop's GRU dynamics have none")
        expect("dynamics_mod.mean_fn.gru_cell.bias_ih", (3 * H,))
        expect("dynamics_mod.mean_fn.gru_cell.bias_hh", (3 * H,))
        expect("dynamics_mod.mean_fn.z_to_h.weight", (H, L))
        expect("dynamics_mod.mean_fn.z_to_h.bias", (H,))
        expect("dynamics_mod.mean_fn.h_to_z.weight", (L, H))
        expect("dynamics_mod.mean_fn.h_to_z.bias", (L,))
    elif dynamics == "linear":
        expect("dynamics_mod.mean_fn.A.weight", (L, L))
    w1 = shape("local_encoder.mlp.0.weight")
    if len(w1) != 2 or min(w1) < 1:
        raise XfadsImportError(f"{ck_name}: {p}local_encoder.mlp.0.weight has shape {list(w1)}, expected [H, N]")
    He, N = w1
    expect("local_encoder.mlp.0.bias", (He,))
    w2 = shape("local_encoder.mlp.3.weight")
    if len(w2) != 2 or w2[1] != He or w2[0] % L or w2[0] // L < 2:
        raise XfadsImportError(f"{ck_name}: {p}local_encoder.mlp.3.weight has shape {list(w2)}, expected "
                               f"[(r+1) x {L}, {He}] with rank r >= 1")
    rank = w2[0] // L - 1
    expect("local_encoder.mlp.3.bias", (w2[0],))
    c = shape("likelihood_pdf.readout_fn.1.weight")
    if len(c) != 2 or c[0] != N or not 1 <= c[1] <= L:
        raise XfadsImportError(f"{ck_name}: {p}likelihood_pdf.readout_fn.1.weight has shape {list(c)}, expected "
                               f"[{N}, Lr] with 1 <= Lr <= {L} ({N} neurons as the encoder reads)")
    Lr = c[1]
    expect("likelihood_pdf.readout_fn.1.bias", (N,))
    gauss = [k for k in GAUSSIAN if k in rel]
    for k in gauss:
        expect(k, (N,))

    # Values.
    out = OrderedDict()
    halves = []
    for k, v in rel.items():
        if v.dtype.kind != "f":
            raise XfadsImportError(f"{ck_name}: {p}{k} holds {v.dtype} values, not floating point")
        if v.dtype.itemsize < 4:
            halves.append(k)
            v = v.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            raise XfadsImportError(f"{ck_name}: {p}{k} has a non-finite value ({v.flat[bad[0]]}) at flat index "
                                   f"{int(bad[0])}")
        out[k] = v
    if halves:
        notes.append(f"widened {len(halves)} half-precision tensors to float32")
    if "likelihood_pdf.R_diag" in out and (out["likelihood_pdf.R_diag"] <= 0).any():
        raise XfadsImportError(f"{ck_name}: {p}likelihood_pdf.R_diag has a value <= 0 (it is a variance)")

    # What the weights do not say.
    meta = ck.metadata
    dt, dt_src = _from_file_meta(dt, meta, "dt", _dt, "--dt")
    if dt is None:
        raise XfadsImportError("--dt is required: the bin width in seconds (xfads's cfg.bin_sz), which no "
                               "checkpoint saves")
    if not (math.isfinite(dt) and dt > 0):
        raise XfadsImportError(f"--dt must be a positive number of seconds (xfads's cfg.bin_sz), not {dt:g}")
    if dt > 1:
        notes.append(f"dt {dt:g} s is unusually long: dt is in seconds (xfads's bin_sz), e.g. 0.02 for 20 ms bins")
    if dt_src:
        notes.append(f"dt {dt:g} from {dt_src}")

    lk, lk_src = _from_file_meta(likelihood, meta, "likelihood", _likelihood, "--likelihood")
    if gauss:
        if lk not in (None, "gaussian"):
            raise XfadsImportError(f"{ck_name}: --likelihood {lk}, but the model has {p}{gauss[0]}, the noise "
                                   "variance of a Gaussian likelihood")
        if lk is None:
            notes.append(f"likelihood gaussian: the model has {gauss[0]}")
        lk = "gaussian"
    elif lk == "gaussian":
        raise XfadsImportError(f"{ck_name}: --likelihood gaussian, but the model has no likelihood_pdf.log_R or "
                               "likelihood_pdf.R_diag (a Gaussian likelihood's noise)")
    elif lk is None:
        raise XfadsImportError("--likelihood poisson or --likelihood bernoulli is required: the two have the same "
                               "tensors (a masked linear readout), so the checkpoint cannot say which it was trained "
                               "with")
    if lk_src:
        notes.append(f"likelihood {lk} from {lk_src}")
    if lk == "bernoulli":
        notes.append("likelihood bernoulli: latentloop's decoder reads poisson models, and refuses this file "
                     "until it reads Bernoulli ones")

    rms, rms_src = _from_file_meta(rmsnorm, meta, "rmsnorm", _parse_bool, "--rmsnorm")
    if dynamics == "gru":
        if rms is None:
            raise XfadsImportError("--rmsnorm true or --rmsnorm false is required for a model with GRU dynamics: "
                                   "xfads's use_layer_norm (an RMSNorm of the GRU's output, without weights) "
                                   "leaves no trace in the checkpoint, and the dynamics differ with it")
        if rms_src:
            notes.append(f"rmsnorm {str(rms).lower()} from {rms_src}")
    else:
        if rms:
            notes.append(f"rmsnorm false: xfads applies use_layer_norm only to GRU dynamics, and these are "
                         f"{dynamics}")
        rms = False

    n_samples, s_src = _from_file_meta(samples, meta, "samples", _samples, "--samples")
    if n_samples is None:
        n_samples = 32
    if n_samples < 1:
        raise XfadsImportError(f"--samples must be at least 1, not {n_samples}")
    if s_src:
        notes.append(f"samples {n_samples} from {s_src}")

    if dynamics == "diffusion":
        notes.append("dynamics diffusion: no mean_fn tensors, taken as xfads's DynamicsEye (z_t = z_(t-1) + "
                     "noise); a parameter-free mean function of another kind would look the same")

    metadata = {
        "dt": repr(float(dt)),
        "rmsnorm": "true" if rms else "false",
        "likelihood": lk,
        "dynamics": dynamics,
        "samples": str(int(n_samples)),
        "xfads_prefix": p,
    }
    dyn = {"gru": f"GRU dynamics (hidden {hidden}, rmsnorm {metadata['rmsnorm']})",
           "linear": "linear dynamics", "diffusion": "diffusion dynamics (identity)"}[dynamics]
    summary = (f"xfads {dyn}, {L} latents ({Lr} read), {N} neurons, encoder hidden {He}, rank {rank}, "
               f"{lk} likelihood, dt {dt:g} s, {n_samples} samples; {len(out)} tensors")
    return Imported(out, metadata, notes, summary)


def import_xfads(checkpoint, out, dt=None, rmsnorm=None, likelihood=None, samples=None, prefix=None) -> Imported:
    """Convert CHECKPOINT and write OUT (.safetensors). Raises XfadsImportError."""
    ck = load_checkpoint(checkpoint)
    res = convert(ck, dt=dt, rmsnorm=rmsnorm, likelihood=likelihood, samples=samples, prefix=prefix)
    if os.path.exists(out) and os.path.samefile(out, checkpoint):
        raise XfadsImportError(f"{out}: is the checkpoint itself; write the model elsewhere")
    write_safetensors(out, res.tensors, res.metadata)
    return res
