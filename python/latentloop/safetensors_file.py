"""Read and write .safetensors files with numpy alone.

The format: an unsigned little-endian 64-bit header length n, n bytes of JSON, then the raw
tensor bytes. The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin,
end]} (offsets into the bytes after the header) and may hold "__metadata__", a map of
strings to strings. Data are little-endian and C-ordered.

`write_safetensors` writes the same bytes for the same input, like the Rust writer
(src/model/file.rs): tensors in name order, header keys sorted, the header padded with
spaces to a multiple of 8 bytes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import numpy as np

# safetensors dtype name -> numpy dtype (little-endian). BF16 has no numpy type: it is read
# as float32, exactly (bfloat16 is the top half of a float32).
_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": None,
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_NAMES = {np.dtype(v).newbyteorder("<") if np.dtype(v).itemsize > 1 else np.dtype(v): k
          for k, v in _DTYPES.items() if v is not None}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file, said in one sentence."""


class TensorFile:
    """What a tensor file holds: `tensors` (name -> numpy array), `metadata` (str -> str) and
    `dtypes` (name -> the dtype as stored, e.g. 'F32', 'BF16')."""

    def __init__(self, tensors, metadata=None, dtypes=None, kind="safetensors"):
        self.tensors = tensors
        self.metadata = dict(metadata or {})
        self.dtypes = dict(dtypes or {})
        self.kind = kind


def _bf16_to_f32(raw, count):
    u = np.frombuffer(raw, dtype="<u2", count=count).astype(np.uint32) << 16
    return u.view(np.float32)


def read_safetensors(path) -> TensorFile:
    with open(path, "rb") as f:
        data = f.read()
    return parse_safetensors(data, str(path))


def parse_safetensors(data: bytes, where="safetensors file") -> TensorFile:
    if len(data) < 8:
        raise SafetensorsError(f"{where}: not a safetensors file ({len(data)} bytes, shorter than its 8-byte "
                               "header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise SafetensorsError(f"{where}: not a safetensors file (header length {n} does not fit the "
                               f"{len(data)}-byte file)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsError(f"{where}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SafetensorsError(f"{where}: __metadata__ must map strings to strings")
    body = memoryview(data)[8 + n:]
    tensors, dtypes = {}, {}
    for name, info in header.items():
        bad = f"{where}: tensor '{name}'"
        if not isinstance(info, dict):
            raise SafetensorsError(f"{bad}: its header entry is not an object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in _DTYPES:
            raise SafetensorsError(f"{bad} has dtype {dt!r}, which this reader does not know")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                   for s in shape)):
            raise SafetensorsError(f"{bad} has a bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                                  for o in offs)):
            raise SafetensorsError(f"{bad} has bad data_offsets {offs!r}")
        b, e = offs
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= b <= e <= len(body) or e - b != count * _ITEMSIZE[dt]:
            raise SafetensorsError(f"{bad}: data_offsets {offs} do not hold {count} {dt} values within the "
                                   f"{len(body)} data bytes (truncated or corrupt?)")
        raw = body[b:e]
        if dt == "BF16":
            arr = _bf16_to_f32(raw, count)
        else:
            arr = np.frombuffer(raw, dtype=_DTYPES[dt], count=count)
        tensors[name] = arr.reshape(shape).copy()
        dtypes[name] = dt
    return TensorFile(tensors, meta, dtypes)


def dtype_name(arr) -> str:
    dt = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    try:
        return _NAMES[dt]
    except KeyError:
        raise SafetensorsError(f"numpy dtype {arr.dtype} has no safetensors name") from None


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dt = dtype_name(arr)
        raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype)
        raw = raw.tobytes()
        header[name] = {"dtype": dt, "shape": [int(s) for s in arr.shape], "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise SafetensorsError(f"metadata {k!r}: {v!r}: keys and values must be strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Write tensors (name -> numpy array) and metadata (str -> str) to path, atomically
    (a temporary file in the same folder, then renamed)."""
    data = safetensors_bytes(tensors, metadata)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(21, "is a folder, not a file name", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    except OSError as e:  # name the file asked for, not the temporary one
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
