"""Read what `torch.save` wrote (a .pt / .ckpt file) with numpy, without torch, and without
running anything the file names.

Since torch 1.6 `torch.save` writes a zip archive: `<root>/data.pkl` is a pickle of the saved
object in which every tensor is a call to `torch._utils._rebuild_tensor_v2` on a storage
named by a persistent id ('storage', torch.FloatStorage, key, location, numel), and the
storage's bytes are the zip member `<root>/data/<key>` (byte order in `<root>/byteorder`).

A pickle can name any Python callable and call it; loading an untrusted one with `pickle` or
`torch.load(weights_only=False)` runs that code. This reader unpickles with an allow-list:
the tensor and parameter rebuild functions, storage types, `torch.Size`, `torch.device`,
torch dtypes, `collections.OrderedDict`, `set`, `frozenset` and `_codecs.encode` (how
protocol 2 writes bytes), each replaced by a numpy stand-in here. Any other name refuses
the whole file, naming it, before anything is called; so does BUILD (`__setstate__`) on
anything but an OrderedDict (whose state, torch's `_metadata`, is dropped).

Tensors come back as numpy arrays (a copy, C-ordered, in the native byte order); bfloat16
storages come back as float32, exactly.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np

MAX_PICKLE = 512 * 1024 * 1024

# torch storage class -> (numpy dtype without byte order, item size)
_STORAGES = {
    "FloatStorage": ("f4", 4), "DoubleStorage": ("f8", 8), "HalfStorage": ("f2", 2),
    "BFloat16Storage": ("bf16", 2), "LongStorage": ("i8", 8), "IntStorage": ("i4", 4),
    "ShortStorage": ("i2", 2), "CharStorage": ("i1", 1), "ByteStorage": ("u1", 1), "BoolStorage": ("?", 1),
}
_TORCH_DTYPES = {
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "float", "double", "half", "long", "int", "short",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_HEAD = pickle.dumps(_LEGACY_MAGIC, protocol=2)  # compared as bytes, never unpickled


class TorchFileError(ValueError):
    """A file this reader will not or cannot read, said in one sentence."""


class TorchDtype(str):
    """A torch dtype the pickle named (torch.float32 -> TorchDtype('float32'))."""


class TorchDevice(str):
    """A torch.device the pickle built (its arguments joined: 'cuda:0')."""


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype, self.itemsize = _STORAGES[name]


class _Storage:
    def __init__(self, key, array):
        self.key = key
        self.array = array


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x):
    return isinstance(x, (tuple, list)) and all(_is_int(v) for v in x)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    if not (_is_int(storage_offset) and _ints(size) and _ints(stride) and len(size) == len(stride)):
        raise TorchFileError(f"a tensor on storage {storage.key} has a bad offset/size/stride "
                             f"({storage_offset!r}, {size!r}, {stride!r})")
    if storage_offset < 0 or any(v < 0 for v in size) or any(v < 0 for v in stride):
        raise TorchFileError(f"a tensor on storage {storage.key} has a negative offset, size or stride")
    arr = storage.array
    if any(v == 0 for v in size):
        return np.zeros(tuple(size), dtype=arr.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= arr.size:
        raise TorchFileError(f"a tensor of size {list(size)} reads element {last} of storage {storage.key}, "
                             f"which holds {arr.size} (truncated or corrupt?)")
    view = np.lib.stride_tricks.as_strided(arr[storage_offset:], shape=tuple(size),
                                           strides=tuple(s * arr.itemsize for s in stride), writeable=False)
    return np.array(view, dtype=arr.dtype.newbyteorder("=") if arr.dtype.itemsize > 1 else arr.dtype, order="C")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(data, np.ndarray):
        raise TorchFileError(f"a parameter wraps {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state=None, *rest):
    return _rebuild_parameter(data)


def _size(dims=()):
    if not _ints(dims):
        raise TorchFileError(f"torch.Size of {dims!r}")
    return tuple(dims)


def _device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise TorchFileError(f"torch.device of {args!r}")
    return TorchDevice(":".join(str(a) for a in args))


def _encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TorchFileError(f"_codecs.encode of {type(text).__name__} as {encoding!r}")
    return text.encode("latin1")


def _set(items=()):
    return set(items)


def _frozenset(items=()):
    return frozenset(items)


class _Unpickler(pickle._Unpickler):  # the pure-Python unpickler: its BUILD can be replaced
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data, zf, root, where):
        super().__init__(io.BytesIO(data))
        self._zf, self._root, self._where = zf, root, where
        self._storages = {}
        order = "little"
        try:
            order = zf.read(f"{root}/byteorder").decode("ascii").strip() or "little"
        except KeyError:
            pass
        if order not in ("little", "big"):
            raise TorchFileError(f"{where}: byteorder {order!r} is neither little nor big")
        self._order = "<" if order == "little" else ">"

    def find_class(self, module, name):
        if module == "__builtin__":
            module = "builtins"
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch._utils" and name == "_rebuild_parameter_with_state":
            return _rebuild_parameter_with_state
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        if module == "torch" and name == "Size":
            return _size
        if module == "torch" and name == "device":
            return _device
        if module == "torch" and name in _TORCH_DTYPES:
            return TorchDtype(name)
        if module == "builtins" and name == "set":
            return _set
        if module == "builtins" and name == "frozenset":
            return _frozenset
        if module == "_codecs" and name == "encode":
            return _encode
        raise TorchFileError(
            f"{self._where}: refusing to unpickle {module}.{name}: this reader takes tensors and plain "
            f"containers only, and loading the file with pickle or torch.load(weights_only=False) would import and "
            f"call {module}.{name} (nothing in it was run here; a whole pickled model must be saved as its "
            f"state_dict() instead)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(f"{self._where}: unknown persistent id {str(pid)[:80]!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise TorchFileError(f"{self._where}: storage {key!r} has type {stype!r}, not a torch storage")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise TorchFileError(f"{self._where}: bad storage reference ({key!r}, {numel!r})")
        if key in self._storages:
            return self._storages[key]
        member = f"{self._root}/data/{key}"
        try:
            info = self._zf.getinfo(member)
        except KeyError:
            raise TorchFileError(f"{self._where}: storage {key} ({member}) is missing from the archive") from None
        need = numel * stype.itemsize
        if info.file_size < need:
            raise TorchFileError(f"{self._where}: storage {key} holds {info.file_size} bytes, {need} needed for "
                                 f"{numel} values of {stype.name} (truncated?)")
        raw = self._zf.read(member)[:need]
        if stype.dtype == "bf16":
            u = np.frombuffer(raw, dtype=self._order + "u2", count=numel).astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif stype.itemsize == 1:
            arr = np.frombuffer(raw, dtype=stype.dtype, count=numel)
        else:
            arr = np.frombuffer(raw, dtype=self._order + stype.dtype, count=numel)
        s = _Storage(key, arr)
        self._storages[key] = s
        return s

    def _load_build(self):
        state = self.stack.pop()  # noqa: F841 (dropped)
        inst = self.stack[-1]
        if type(inst) is collections.OrderedDict:
            return
        raise TorchFileError(f"{self._where}: refusing to set the state of a {type(inst).__name__} "
                             "(only an OrderedDict's is accepted)")

    dispatch[pickle.BUILD[0]] = _load_build


def _sniff(head: bytes, where):
    if head[:2] == b"PK":
        return
    if head[:1] == b"\x80":
        # A pickle stream: the pre-1.6 torch.save format starts with a pickled magic number.
        if head.startswith(_LEGACY_HEAD):
            raise TorchFileError(
                f"{where}: written in torch's legacy format (torch.save before torch 1.6, or with "
                "_use_new_zipfile_serialization=False), which this reader does not take; load it with torch and "
                "save it again with a current torch.save, or as .safetensors")
        raise TorchFileError(f"{where}: a bare pickle, not a torch.save zip archive (this reader does not "
                             "unpickle bare pickles)")
    raise TorchFileError(f"{where}: not a torch file (torch.save writes a zip archive; this file starts "
                         f"with {head[:8]!r})")


def load_torch(path):
    """The object a torch.save file holds, tensors as numpy arrays. Raises TorchFileError."""
    where = str(path)
    with open(path, "rb") as f:
        head = f.read(64)
    _sniff(head, where)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise TorchFileError(f"{where}: not a readable zip archive ({e})") from None
    with zf:
        names = zf.namelist()
        roots = sorted({n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1})
        if len(roots) != 1:
            if any(n.endswith("constants.pkl") for n in names):
                raise TorchFileError(f"{where}: a TorchScript archive (torch.jit.save), not a torch.save file; "
                                     "save the model's state_dict() with torch.save instead")
            raise TorchFileError(f"{where}: a zip archive but not a torch.save file "
                                 f"({'no' if not roots else 'several'} <root>/data.pkl)")
        root = roots[0]
        if f"{root}/constants.pkl" in names or any(n.startswith(f"{root}/code/") for n in names):
            raise TorchFileError(f"{where}: a TorchScript archive (torch.jit.save), not a torch.save file; "
                                 "save the model's state_dict() with torch.save instead")
        info = zf.getinfo(f"{root}/data.pkl")
        if info.file_size > MAX_PICKLE:
            raise TorchFileError(f"{where}: data.pkl is {info.file_size} bytes, more than this reader takes")
        try:
            data = zf.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise TorchFileError(f"{where}: {root}/data.pkl cannot be read ({e})") from None
        try:
            return _Unpickler(data, zf, root, where).load()
        except TorchFileError:
            raise
        except (zipfile.BadZipFile, OSError) as e:
            raise TorchFileError(f"{where}: a storage cannot be read ({e})") from None
        except Exception as e:  # a malformed pickle: UnpicklingError, EOFError, IndexError, TypeError...
            raise TorchFileError(f"{where}: {root}/data.pkl is not a readable pickle "
                                 f"({type(e).__name__}: {e})") from None
