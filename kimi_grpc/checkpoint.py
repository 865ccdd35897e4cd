"""Reading checkpoints exactly as Moonshot ships them: sharded safetensors behind an index.

* ``model.safetensors.index.json`` maps tensor names to shard files (or a lone
  ``model.safetensors``);
* every shard header is parsed and checked against the file size before any data is read, so a
  truncated shard or an index pointing at a missing file fails at load time, naming the file;
* tensors are read through a private memory map of each shard, only those the model asks for and
  only the slice a tensor-parallel rank needs: a loader copies from a zero-copy view, then the
  view's pages are released (``MADV_DONTNEED``), so peak resident memory stays at the model's own
  tensors plus the one tensor being copied — never a second copy of the checkpoint.

Nothing in a checkpoint is executed: ``auto_map`` / ``*.py`` files are ignored.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a checkpoint needs for serving; everything else in a hub repo (code, images) is skipped.
SERVING_FILE_PATTERNS = ("*.json", "*.safetensors", "tiktoken.model", "*.jinja")

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor or file at fault."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


class _MappedShard:
    """A shard mapped copy-on-write (reads never copy); tensors are zero-copy views into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)

    def view(self, info: TensorInfo) -> torch.Tensor:
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return raw.view(info.dtype).view(info.shape)

    def release(self, info: TensorInfo) -> None:
        """Drops the tensor's pages from this process (the OS page cache may keep them)."""
        start = info.offset - info.offset % mmap.PAGESIZE
        length = info.offset + info.nbytes - start
        if info.nbytes:
            self._map.madvise(mmap.MADV_DONTNEED, start, length)

    def close(self) -> None:
        self._file.close()
        # Each live view holds a reference to the map (torch.frombuffer keeps its buffer alive);
        # beyond ours and getrefcount's own, a reference means a loader kept a view instead of
        # copying. Unmapping then would leave that view pointing at freed memory.
        if sys.getrefcount(self._map) > 2:
            raise RuntimeError(f"{self.path}: a loader kept a view of the mapped checkpoint")
        self._map.close()


class TensorSlice:
    """A checkpoint tensor handed to a loader. ``read()`` / indexing return zero-copy views of the
    mapped file, valid only during the loader call: copy what you need into the model."""

    def __init__(self, info: TensorInfo, shard: _MappedShard) -> None:
        self.info = info
        self._shard = shard

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    def read(self) -> torch.Tensor:
        return self._shard.view(self.info)

    def __getitem__(self, index: object) -> torch.Tensor:
        return self.read()[index]


# A loader receives the unread tensor and copies (its part of) it into the model.
TensorLoader = Callable[[TensorSlice], None]


@dataclass(frozen=True)
class TensorSpec:
    """What the model expects of one checkpoint tensor."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    load: TensorLoader


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: file is too short to be safetensors")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: header length {header_len} exceeds the file size")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"shard file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')}"
            )
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        nbytes = _numel(shape) * dtype.itemsize
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {end} but the shard holds only "
                f"{data_size} data bytes (truncated file?)"
            )
        if end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name} spans {end - begin} bytes; shape {list(shape)} of "
                f"{dtype} needs {nbytes}"
            )
        tensors[name] = TensorInfo(name, path, shape, dtype, 8 + header_len + begin, nbytes)
    return tensors


class CheckpointReader:
    """The tensor directory of a checkpoint folder (headers only; data is read by :meth:`load`)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: malformed index ({exc!r})") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).exists():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"{self.directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}: not a checkpoint"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for file_name in files:
            path = self.directory / file_name
            if not path.exists():
                raise CheckpointError(
                    f"the index names shard file {file_name}, which does not exist"
                )
            for name, info in _read_header(path).items():
                if weight_map is None or weight_map.get(name) == file_name:
                    self.tensors[name] = info
        if weight_map is not None:
            for name, file_name in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(
                        f"the index maps tensor {name} to {file_name}, which does not contain it"
                    )

    @property
    def total_bytes(self) -> int:
        return sum(info.dtype.itemsize * _numel(info.shape) for info in self.tensors.values())

    def load(self, specs: dict[str, TensorSpec]) -> None:
        """Validates every requested tensor, then streams them shard by shard into ``specs``."""
        by_file: dict[Path, list[str]] = {}
        for name, spec in specs.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"checkpoint is missing tensor {name}")
            if info.shape != spec.shape:
                raise CheckpointError(
                    f"tensor {name} in {info.file.name} has shape {list(info.shape)}, "
                    f"expected {list(spec.shape)}"
                )
            if info.dtype not in spec.dtypes:
                raise CheckpointError(
                    f"tensor {name} in {info.file.name} has dtype {info.dtype}, expected one of "
                    f"{[str(d) for d in spec.dtypes]}"
                )
            by_file.setdefault(info.file, []).append(name)
        for path, names in sorted(by_file.items()):
            try:
                shard = _MappedShard(path)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot map shard ({exc})") from None
            try:
                for name in names:
                    info = self.tensors[name]
                    specs[name].load(TensorSlice(info, shard))
                    shard.release(info)
            finally:
                shard.close()


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local checkpoint folder, or a Hugging Face repo id resolved through huggingface_hub.

    With ``HF_HUB_OFFLINE=1`` the repo must already be in the local HF cache. Only serving files
    are fetched (config, safetensors, tokenizer, template): no checkpoint code is ever downloaded.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"--model {model} is a file; expected a checkpoint directory")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise CheckpointError(
            f"--model {model!r} is neither an existing directory nor a Hugging Face repo id "
            "(owner/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(
            repo_id=model, revision=revision, allow_patterns=list(SERVING_FILE_PATTERNS)
        )
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise CheckpointError(f"cannot resolve {model}@{revision or 'main'}{hint}: {exc}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot download {model}@{revision or 'main'}: {exc}") from None
    return Path(local)
