"""Streaming access to Hugging Face safetensors checkpoints: read one tensor (or one slice) at a time,
write bounded-size shards one tensor at a time.

Reading opens the file for each tensor and closes it again. ``safe_open`` memory-maps the file, and every
page a read touches stays resident (and counts in the process's RSS) for as long as the mapping lives, so
a handle kept open across a whole checkpoint ends up holding the whole file next to the converted weights.

Writing lays out each shard's header from the planned names, shapes and dtypes first, then streams the
tensor bytes in header order, so only the tensor being written has to exist at any time. The file format
(an 8-byte little-endian header length, a JSON header with ``data_offsets`` relative to the end of the
header, then the raw little-endian bytes) is the one documented by the safetensors project.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ConversionError",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "HFWeights",
    "PlannedTensor",
    "copy_files",
    "parse_size",
    "write_sharded",
]

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: unsupported architecture or settings, missing or extra
    tensors, shapes that disagree with the config, malformed files. The message names the culprit."""


def parse_size(text: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a plain integer (decimal units, like HF's hub)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    unit = next((u for u in units if s.endswith(u) and len(s) > len(u)), None)
    number, scale = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB or a byte count)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * scale)


class HFWeights:
    """The tensors of an HF checkpoint directory (``model.safetensors`` or a sharded index).

    Metadata (names, shapes, dtypes) comes from the file headers; tensor data is read on request, whole or
    as a contiguous range along one dimension (a tensor-parallel shard).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        single = self.directory / SAFETENSORS_SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [SAFETENSORS_SINGLE]
        else:
            found = sorted(p.name for p in self.directory.glob("*.bin")) if self.directory.is_dir() else []
            hint = (
                f" (found PyTorch pickles {', '.join(found[:3])}: re-save with safe_serialization=True)"
                if found
                else ""
            )
            raise ConversionError(f"{self.directory}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}{hint}")
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise ConversionError(f"{index}: names shard {name}, which does not exist")
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in self._file_of:
                        raise ConversionError(f"{self.directory}: tensor {key} is stored in two shards")
                    sl = f.get_slice(key)
                    self._file_of[key] = path
                    self._shape[key] = tuple(sl.get_shape())
                    self._dtype[key] = sl.get_dtype()

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype_code(self, name: str) -> str:
        """The safetensors dtype code (``"BF16"``, ``"F32"``, ...)."""
        return self._dtype[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or its slice ``[start, end)`` along ``dim``; only those bytes are read."""
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as f:
            if dim is None:
                return f.get_tensor(name)
            index = [slice(None)] * len(self._shape[name])
            index[dim] = slice(start, end)
            # The slice owns its memory; nothing refers to the mapping once the file is closed.
            return f.get_slice(name)[tuple(index)]


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output checkpoint: known shape and dtype up front, data produced on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        # A tensor larger than the limit gets a shard of its own rather than failing.
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_shard(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"{t.name}: dtype {t.dtype} cannot be stored in safetensors")
        header[t.name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            data = t.produce()
            if tuple(data.shape) != t.shape or data.dtype != t.dtype:
                raise AssertionError(
                    f"{t.name}: planned {t.shape} {t.dtype}, produced {tuple(data.shape)} {data.dtype}"
                )
            # A byte view of the contiguous tensor: written without an intermediate copy.
            f.write(data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del data


def write_sharded(
    directory: str | os.PathLike, tensors: Iterable[PlannedTensor], max_shard_bytes: int
) -> list[Path]:
    """Write ``tensors`` as HF-style safetensors shards into ``directory``.

    One shard is ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json`` (``metadata.total_size`` and the ``weight_map``), as ``transformers``
    writes them. Returns the shard paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in the write plan")
    shards = _plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    paths = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = SAFETENSORS_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_shard(directory / fname, shard, {"format": "pt"})
        paths.append(directory / fname)
        weight_map.update({t.name: fname for t in shard})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy the regular files among ``names`` from ``src`` to ``dst``; returns the names copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def replace_dir(staging: Path, out: Path) -> None:
    """Put the finished directory ``staging`` at ``out``, replacing what is there: the old one is moved
    aside first and removed only after the rename, so ``out`` is never half-written."""
    import os
    import shutil

    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)
