"""Safe ONNX file I/O: validated loading, external data kept on disk, atomic saving."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sdgraph.errors import InputError
from sdgraph.ir.proto import (  # noqa: F401 (re-exported for io.* callers)
    _model_tensors, external_data_files, external_info, is_external, iter_model_tensors, iter_tensors,
)
from sdgraph.ir.outputs import atomic_dir, atomic_file, check_output_path  # noqa: F401 (one place: outputs.py)

__all__ = [
    "DATA_SUFFIX",
    "MAX_IR_VERSION",
    "INLINE_LIMIT",
    "atomic_dir",
    "atomic_file",
    "check_external",
    "check_output_path",
    "copy_inside",
    "external_data_files",
    "external_info",
    "is_external",
    "iter_model_tensors",
    "iter_tensors",
    "load_proto",
    "read_external",
    "resolve_model_file",
    "write_proto",
    "rewrite_initializers",
    "side_data_file",
]

log = logging.getLogger(__name__)

DATA_SUFFIX = "_data"  # model.onnx -> model.onnx_data (optimum's convention)
MAX_IR_VERSION = 10  # onnx 1.23 writes 14; onnxruntime 1.31 and OpenVINO 2026 refuse > 13 / > 10
INLINE_LIMIT = 1024  # tensors at most this many bytes stay inside the graph message
_COPY_CHUNK = 64 << 20


def resolve_model_file(path: str | os.PathLike) -> Path:
    """Return the ``.onnx`` file that ``path`` names: a file, or a directory holding ``model.onnx``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir():
        cand = p / "model.onnx"
        if cand.is_file():
            return cand
        onnx_files = sorted(p.glob("*.onnx"))
        if len(onnx_files) == 1:
            return onnx_files[0]
        raise InputError(f"{p}: directory holds no model.onnx (pass the submodel file, e.g. {p}/unet/model.onnx)")
    return p


def _safe_location(base: Path, location: str, tensor_name: str, model_path: Path) -> Path:
    """Resolve an external-data location, rejecting anything outside the model's folder."""
    if not location or os.path.isabs(location) or location.startswith(("\\", "/")) or ":" in location:
        raise InputError(
            f"{model_path}: tensor {tensor_name!r} has external data at {location!r}, "
            "outside the model's folder (rejected)"
        )
    resolved = (base / location).resolve()
    base_resolved = base.resolve()
    if resolved != base_resolved and base_resolved not in resolved.parents:
        raise InputError(
            f"{model_path}: tensor {tensor_name!r} has external data at {location!r}, "
            "outside the model's folder (rejected)"
        )
    return resolved


def load_proto(path: str | os.PathLike, inline_limit: int = INLINE_LIMIT) -> tuple[onnx.ModelProto, Path]:
    """Load a model without its large weights; validate every external reference.

    Weights larger than ``inline_limit`` stay on disk (the returned proto keeps their external
    references); smaller external tensors are read in so shape inference and folding can see them.
    Returns the proto and the directory external locations are relative to.
    """
    path = resolve_model_file(path)
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError / RuntimeWarning subclasses
        raise InputError(f"{path}: cannot be parsed as ONNX (not an ONNX file, or truncated): {type(exc).__name__}") from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and size < 64 and not proto.opset_import):
        raise InputError(f"{path}: cannot be parsed as ONNX (not an ONNX file, or truncated)")
    if len(proto.graph.node) == 0:
        raise InputError(f"{path}: the graph is empty (no nodes)")
    if not proto.graph.output:
        raise InputError(f"{path}: the graph has no outputs")
    base = path.parent
    for t in iter_model_tensors(proto):
        if not is_external(t):
            continue
        _, offset, length = check_external(t, base, path)
        if length <= inline_limit:
            t.raw_data = read_external(t, base)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    return proto, base


_SUB_BYTE = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}
_DIGITS = re.compile(r"[0-9]+\Z")


def expected_nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes the raw data of ``t`` must hold (dims x element size); None when unknown (strings)."""
    n = 1
    for d in t.dims:
        if d < 0:
            return -1
        n *= d
    if t.data_type in _SUB_BYTE:
        return (n + 1) // 2
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # an unknown data type number
        return None


def check_external(t: onnx.TensorProto, base: Path, model_path: Path) -> tuple[Path, int, int]:
    """Validate one external reference; return (file, offset, length).

    The file must be a regular file inside the model's folder (after resolving links); offset and
    length non-negative integers; length equal to dims x element size; the file long enough.
    """
    info = external_info(t)
    where = f"{model_path}: tensor {t.name!r}"
    location = info.get("location", "")
    file = _safe_location(base, location, t.name, model_path)
    if not file.exists():
        raise InputError(f"{where}: external data file {location!r} is missing")
    if not file.is_file():
        raise InputError(f"{where}: external data {location!r} is not a regular file")
    for key in ("offset", "length"):
        if key in info and not _DIGITS.match(info[key].strip()):
            raise InputError(f"{where}: external data {key} {info[key]!r} is not a non-negative integer")
    size = file.stat().st_size
    offset = int(info.get("offset", "0").strip())
    length = int(info["length"].strip()) if "length" in info else size - offset
    want = expected_nbytes(t)
    if want is not None and length != want:
        raise InputError(f"{where}: external data holds {length} bytes but dims {list(t.dims)} of "
                         f"{onnx.TensorProto.DataType.Name(t.data_type)} need {want}")
    if offset + length > size or length < 0:
        raise InputError(f"{where}: external data file {location!r} is truncated "
                         f"(needs bytes {offset}..{offset + length}, has {size})")
    return file, offset, length


def read_external(t: onnx.TensorProto, base: Path) -> bytes:
    info = external_info(t)
    file = base / info["location"]
    offset = int(info.get("offset", 0))
    with open(file, "rb") as f:
        f.seek(offset)
        if "length" in info:
            return f.read(int(info["length"]))
        return f.read()


def _tensor_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    arr = numpy_helper.to_array(t)
    return np.ascontiguousarray(arr).tobytes()


def write_proto(
    proto: onnx.ModelProto,
    out_file: Path,
    source_base: Path | None,
    inline_limit: int = INLINE_LIMIT,
    data_name: str | None = None,
) -> int:
    """Write ``proto`` to ``out_file`` with weights in one data file beside it (``data_name``, default ``<name>_data``).

    Tensors that still point at the source model's external data are streamed file to file, so a
    3.4 GB UNet never becomes one in-memory protobuf. ``proto`` is modified in place (its tensors
    are made to point at the new data file). Returns the bytes of external data written.
    """
    data_name = data_name or out_file.name + DATA_SUFFIX
    data_path = out_file.parent / data_name
    written = 0
    handles: dict[Path, object] = {}
    try:
        with open(data_path, "wb") as out:
            for t, movable in _model_tensors(proto):
                if is_external(t):
                    if source_base is None:
                        raise InputError(f"tensor {t.name!r} refers to external data but the model has no source folder")
                    src, offset, length = check_external(t, source_base, source_base)
                    fh = handles.get(src)
                    if fh is None:
                        fh = handles[src] = open(src, "rb")
                    pos = _align(out, written)
                    _copy_range(fh, offset, out, length, src, t.name)
                    written = pos + length
                    _set_external(t, data_name, pos, length)
                elif movable:
                    nbytes = len(t.raw_data) if t.HasField("raw_data") else (expected_nbytes(t) or 0)
                    if nbytes <= inline_limit or t.data_type == onnx.TensorProto.STRING:
                        continue
                    data = _tensor_bytes(t)
                    pos = _align(out, written)
                    out.write(data)
                    written = pos + len(data)
                    _clear_data(t)
                    _set_external(t, data_name, pos, len(data))
    finally:
        for fh in handles.values():
            fh.close()
    if written == 0:
        data_path.unlink()
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    with open(out_file, "wb") as f:
        f.write(proto.SerializeToString())
    return written


def _copy_range(fh, offset: int, out, length: int, src: Path, name: str) -> None:
    """Copy ``length`` bytes at ``offset`` of ``fh`` to the end of ``out`` (in-kernel when possible)."""
    out.flush()
    remaining, pos = length, offset
    if hasattr(os, "copy_file_range"):
        try:
            while remaining:
                n = os.copy_file_range(fh.fileno(), out.fileno(), min(remaining, 1 << 30), pos)
                if n == 0:
                    break
                remaining -= n
                pos += n
        except OSError:
            pass  # e.g. across filesystems on old kernels: fall back to read/write
        out.seek(0, os.SEEK_END)
    fh.seek(pos)
    while remaining:
        chunk = fh.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise InputError(f"{src}: external data ends early for tensor {name!r}")
        out.write(chunk)
        remaining -= len(chunk)


def _align(out, pos: int, alignment: int = 64) -> int:
    pad = (-pos) % alignment
    if pad:
        out.write(b"\0" * pad)
    return pos + pad


def _clear_data(t: onnx.TensorProto) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def copy_inside(src: str | os.PathLike, dst: str | os.PathLike, root: str | os.PathLike,
                share: frozenset[Path] = frozenset()) -> None:
    """Copy the file or folder ``src`` to ``dst`` without ever leaving the folder ``root``.

    Symbolic links are resolved and copied as what they point at, only when that lies inside
    ``root``; FIFOs, sockets and devices are refused (reading a FIFO would block for ever), and so
    are symlink loops and dangling links. Every refusal is an InputError naming the path.
    Files whose resolved path is in ``share`` become hard links where the filesystem allows (else
    copies): only for files nobody writes again (``sdgraph refit``'s weight files, see
    ``rewrite_initializers(side=True)``).
    """
    _copy_inside(Path(src), Path(dst), Path(root).resolve(), (), frozenset(Path(p).resolve() for p in share))


def _copy_inside(src: Path, dst: Path, root: Path, ancestors: tuple[Path, ...], share: frozenset[Path] = frozenset()) -> None:
    try:
        real = src.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise InputError(f"{src}: symlink loop; refusing to copy it") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{src}: symlink loop; refusing to copy it") from None
        raise InputError(f"{src}: cannot be read ({exc.strerror}; a dangling link?)") from None
    if real != root and root not in real.parents:
        raise InputError(f"{src}: links to {real}, outside the model folder {root}; refusing to copy it")
    st = os.stat(real)
    if stat.S_ISDIR(st.st_mode):
        if real in ancestors:
            raise InputError(f"{src}: symlink loop (links back to {real}); refusing to copy it")
        dst.mkdir()
        for name in sorted(os.listdir(real)):
            _copy_inside(real / name, dst / name, root, ancestors + (real,), share)
    elif stat.S_ISREG(st.st_mode):
        if real in share:
            try:
                os.link(real, dst)
                return
            except OSError:  # another filesystem, or links not allowed: copy
                pass
        shutil.copyfile(real, dst)
        shutil.copystat(real, dst)
    else:
        raise InputError(f"{src}: not a regular file or folder (a FIFO, socket or device); refusing to copy it")



def side_data_file(model_file: str | os.PathLike) -> Path:
    """Where ``rewrite_initializers(side=True)`` keeps the tensors it rewrote: model.onnx -> model.refit.onnx_data."""
    model_file = Path(model_file)
    return model_file.with_name(f"{model_file.stem}.refit{model_file.suffix}{DATA_SUFFIX}")


def rewrite_initializers(model_file: str | os.PathLike, values: dict[str, np.ndarray],
                         expect: dict[str, np.ndarray] | None = None, side: bool = False) -> list[str]:
    """Give initializers of ``model_file`` new values; returns the names not written (absent, another size or
    dtype, or, with ``expect``, not holding the expected bytes now). Used by ``sdgraph refit``.

    Inline initializers change in the graph message. External ones: ``side=False`` overwrites their bytes
    in their data file; ``side=True`` leaves every existing data file as it is and moves them to the
    model's own side file (``side_data_file``, rewritten whole: the tensors already there and not changed
    now are kept), so the big data file can be shared (hard-linked) with the artifact it came from."""
    model_file = Path(model_file)
    proto = onnx.load(str(model_file), load_external_data=False)
    missed, dirty = [], False
    by_name = {t.name: t for t in proto.graph.initializer}
    moved: dict[str, np.ndarray] = {}
    for name, value in values.items():
        t = by_name.get(name)
        arr = np.ascontiguousarray(value)
        if t is None or tuple(t.dims) != arr.shape or onnx.helper.tensor_dtype_to_np_dtype(t.data_type) != arr.dtype:
            missed.append(name)
            continue
        if is_external(t):
            file, offset, length = check_external(t, model_file.parent, model_file)
            if length != arr.nbytes:
                missed.append(name)
                continue
            if expect is not None and name in expect:
                with open(file, "rb") as f:
                    f.seek(offset)
                    if f.read(length) != np.ascontiguousarray(expect[name]).tobytes():
                        missed.append(name)
                        continue
            if side:
                moved[name] = arr
                continue
            with open(file, "r+b") as f:
                f.seek(offset)
                f.write(arr.tobytes())
        else:
            if expect is not None and name in expect and not np.array_equal(numpy_helper.to_array(t), expect[name]):
                missed.append(name)
                continue
            t.CopyFrom(numpy_helper.from_array(arr, name))
            dirty = True
    if moved:
        side_file = side_data_file(model_file)
        keep = [t for t in proto.graph.initializer
                if is_external(t) and external_info(t).get("location") == side_file.name and t.name not in moved]
        kept = {t.name: read_external(t, model_file.parent) for t in keep}
        tmp = side_file.with_name(side_file.name + ".new")
        with open(tmp, "wb") as out:
            pos = 0
            for t in keep + [by_name[n] for n in moved]:
                data = kept[t.name] if t.name in kept else moved[t.name].tobytes()
                pos = _align(out, pos)
                out.write(data)
                _clear_data(t)
                _set_external(t, side_file.name, pos, len(data))
                pos += len(data)
        os.replace(tmp, side_file)
        dirty = True
    if dirty:
        tmp = model_file.with_name(model_file.name + ".new")
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, model_file)  # a new file: never written through a link it may share
    return missed
