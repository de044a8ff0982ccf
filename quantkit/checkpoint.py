"""Read and write Hugging Face checkpoint folders.

Every command goes through this module so that the rules hold everywhere: tensors are
read one at a time (memory-mapped safetensors, `weights_only` pickles), sources are never
modified, and outputs appear only when complete (written into a temporary sibling folder,
then renamed into place) with a `quantkit.json` manifest of what went in and came out.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.errors import CheckpointError, OutputError

log = logging.getLogger(__name__)

MANIFEST_NAME = "quantkit.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# Files holding weights in formats we do not read; copying them into an artifact would
# ship a second, unquantized copy of the model.
_FOREIGN_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5",
                            ".msgpack", ".onnx", ".onnx_data")


# --------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """A checkpoint folder opened for reading: config, weight files and a tensor map."""

    path: Path
    config: dict
    weight_format: str  # "safetensors" or "bin"
    weight_map: dict[str, str]  # tensor name -> file name inside `path`
    _open_files: dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def weight_files(self) -> list[str]:
        """Weight file names in shard order."""
        return sorted(set(self.weight_map.values()))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    @property
    def remote_code_files(self) -> list[str]:
        return sorted(p.name for p in self.path.glob("*.py"))

    @property
    def has_remote_code(self) -> bool:
        return bool(self.config.get("auto_map")) and bool(self.remote_code_files)

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, read on its own (memory-mapped for safetensors)."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} in the checkpoint")
        file_name = self.weight_map[name]
        if self.weight_format == "safetensors":
            return self._safetensors_handle(file_name).get_tensor(name)
        return self._bin_state(file_name)[name]

    def tensor_meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """Dtype and shape without reading the data (safetensors header or mmapped pickle)."""
        if self.weight_format == "safetensors":
            sl = self._safetensors_handle(self.weight_map[name]).get_slice(name)
            return _SAFETENSORS_DTYPES[sl.get_dtype()], tuple(sl.get_shape())
        tensor = self.get_tensor(name)
        return tensor.dtype, tuple(tensor.shape)

    def iter_shards(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Yield (file name, tensors) one shard at a time so peak memory is one shard."""
        for file_name in self.weight_files:
            names = [n for n, f in self.weight_map.items() if f == file_name]
            yield file_name, {n: self.get_tensor(n) for n in names}
            self.release(file_name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for _, tensors in self.iter_shards():
            yield from tensors.items()

    def release(self, file_name: str | None = None) -> None:
        """Drop cached file handles (all, or one file's)."""
        names = [file_name] if file_name else list(self._open_files)
        for name in names:
            self._open_files.pop(name, None)

    def non_weight_files(self) -> list[Path]:
        """Tokenizer, generation config, remote code, docs: everything an artifact must keep."""
        skip = set(self.weight_files) | {SAFETENSORS_INDEX, BIN_INDEX, MANIFEST_NAME}
        out = []
        for p in sorted(self.path.iterdir()):
            if p.name in skip or p.name.startswith(".") or not p.is_file():
                continue
            if p.name.endswith(_FOREIGN_WEIGHT_SUFFIXES):
                log.warning("not copying %s: weights in a format quantkit does not read", p.name)
                continue
            out.append(p)
        return out

    def _safetensors_handle(self, file_name: str):
        handle = self._open_files.get(file_name)
        if handle is None:
            handle = _open_safetensors(self.path / file_name)
            self._open_files[file_name] = handle
        return handle

    def _bin_state(self, file_name: str) -> dict[str, torch.Tensor]:
        state = self._open_files.get(file_name)
        if state is None:
            state = _load_bin(self.path / file_name)
            self._open_files[file_name] = state
        return state


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint folder, checking that every weight file it names is there and whole."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or folder; check the model path")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file; pass the model folder that holds config.json")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: not a checkpoint folder (no config.json); pass a Hugging Face model folder"
        )
    config = read_json(config_path)
    weight_format, weight_map = _find_weights(folder)
    ckpt = Checkpoint(path=folder, config=config, weight_format=weight_format,
                      weight_map=weight_map)
    for file_name in ckpt.weight_files:
        if not (folder / file_name).is_file():
            index = SAFETENSORS_INDEX if weight_format == "safetensors" else BIN_INDEX
            raise CheckpointError(
                f"{folder / file_name}: listed in {index} but missing; download it again"
            )
        if weight_format == "safetensors":
            _check_safetensors_whole(folder / file_name)
    return ckpt


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def _find_weights(folder: Path) -> tuple[str, dict[str, str]]:
    if (folder / SAFETENSORS_INDEX).is_file():
        return "safetensors", dict(read_json(folder / SAFETENSORS_INDEX)["weight_map"])
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        return "safetensors", _map_from_files(folder, singles, "safetensors")
    if (folder / BIN_INDEX).is_file():
        return "bin", dict(read_json(folder / BIN_INDEX)["weight_map"])
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return "bin", _map_from_files(folder, bins, "bin")
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, shards with "
        f"{SAFETENSORS_INDEX}, or pytorch_model.bin)"
    )


def _map_from_files(folder: Path, files: list[Path], fmt: str) -> dict[str, str]:
    weight_map: dict[str, str] = {}
    for f in files:
        if fmt == "safetensors":
            _check_safetensors_whole(f)
            names = _safetensors_keys(f)
        else:
            names = list(_load_bin(f))
        weight_map.update({n: f.name for n in names})
    return weight_map


def _check_safetensors_whole(path: Path) -> None:
    """Catch truncated downloads early: the header's last offset must equal the data size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); download it again"
        ) from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated ({size} bytes, header promises {8 + header_len + end}); "
            "download it again"
        )


def _safetensors_keys(path: Path) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict without executing code (weights_only) and memory-mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (pre-zipfile) pickles cannot be memory-mapped; still weights_only.
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read PyTorch weights ({exc})") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read PyTorch weights safely ({exc})") from exc


# --------------------------------------------------------------------------- writing


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*1024**3, 1000 -> 1000 (Hugging Face units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.I)
    if not m:
        raise OutputError(f"--max-shard-size {size!r}: use a size like 5GB, 500MB or 2GiB")
    number, prefix, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(prefix or " "))


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike, *, source: str | os.PathLike | None = None,
                  force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `dest` only if the block completes.

    Any exception (Ctrl-C included) removes the temporary folder, so a failed run
    leaves nothing behind and an existing `dest` is untouched.
    """
    dest = Path(dest).absolute()
    check_destination(dest, source=source, force=force)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"{dest.parent}: cannot write here ({exc.strerror}); "
                          "choose another --out") from exc
    try:
        yield tmp
        _replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_file_destination(dest: str | os.PathLike, flag: str = "--out") -> Path:
    """A single output file (result JSON, report): its folder must exist and be writable."""
    dest = Path(dest).absolute()
    if dest.is_dir():
        raise OutputError(f"{flag} {dest}: is a folder; pass a file path")
    if not dest.parent.is_dir():
        raise OutputError(f"{flag} {dest}: no folder {dest.parent}; create it first")
    if not os.access(dest.parent, os.W_OK):
        raise OutputError(f"{flag} {dest}: {dest.parent} is not writable; choose another path")
    return dest


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling path; it replaces `dest` only if the block completes."""
    dest = check_file_destination(dest, flag)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_destination(dest: Path, *, source: str | os.PathLike | None, force: bool) -> None:
    """Refuse an existing destination (unless forced), one inside the source, or no parent."""
    dest = Path(dest).absolute().resolve()
    if source is not None:
        src = Path(source).absolute().resolve()
        if dest == src or src in dest.parents:
            raise OutputError(f"{dest}: is inside the source {src}; write the output elsewhere")
    if dest.exists() and not force:
        raise OutputError(f"{dest}: already exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{dest}: exists and is not a folder; choose another --out")
    if not dest.parent.is_dir():
        raise OutputError(f"{dest.parent}: no such folder; create it or choose another --out")
    if not os.access(dest.parent, os.W_OK):
        raise OutputError(f"{dest.parent}: not writable; choose another --out")


def _replace_folder(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


class ShardedWriter:
    """Write tensors into safetensors (or .bin) shards of at most `max_shard_size` bytes.

    Tensors are buffered until a shard is full, so peak memory is about one shard.
    `close()` names the shards the Hugging Face way and writes the index when needed.
    """

    def __init__(self, folder: Path, *, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                 weight_format: str = "safetensors"):
        if weight_format not in ("safetensors", "bin"):
            raise ValueError(weight_format)
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        self.weight_format = weight_format
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp_name = f"shard-{len(self._shards):05d}.partial"
        if self.weight_format == "safetensors":
            save_file(self._pending, str(self.folder / tmp_name), metadata={"format": "pt"})
        else:
            torch.save(self._pending, self.folder / tmp_name)
        self._shards.append((tmp_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish writing; return the final weight file names."""
        self._flush()
        stem, ext, index_name = (("model", "safetensors", SAFETENSORS_INDEX)
                                 if self.weight_format == "safetensors"
                                 else ("pytorch_model", "bin", BIN_INDEX))
        count = len(self._shards)
        final_names = []
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self._shards, start=1):
            final = f"{stem}.{ext}" if count == 1 else f"{stem}-{i:05d}-of-{count:05d}.{ext}"
            (self.folder / tmp_name).rename(self.folder / final)
            final_names.append(final)
            weight_map.update({n: final for n in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_json(self.folder / index_name, index)
        return final_names


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def copy_non_weight_files(source: Checkpoint, folder: Path) -> list[str]:
    """Copy tokenizer, configs, remote code and docs into the output folder."""
    copied = []
    for p in source.non_weight_files():
        shutil.copy2(p, folder / p.name)
        copied.append(p.name)
    return copied


def source_fingerprint(source: Checkpoint) -> dict:
    """Where the weights came from: the folder and a sha256 of each weight file."""
    return {
        "path": str(source.path.absolute()),
        "weight_files": {name: sha256_file(source.path / name) for name in source.weight_files},
    }


def write_manifest(folder: Path, *, source: Checkpoint | None, extra: dict | None = None,
                   started: _dt.datetime | None = None) -> dict:
    """Write quantkit.json: tool, command line, source hashes, output hashes, timestamps."""
    from quantkit import __version__

    now = _dt.datetime.now(_dt.timezone.utc)
    manifest = {
        "tool": "quantkit",
        "version": __version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": (started or now).isoformat(timespec="seconds"),
        "finished": now.isoformat(timespec="seconds"),
        "source": source_fingerprint(source) if source is not None else None,
    }
    manifest.update(extra or {})
    manifest["files"] = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME
    }
    write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST_NAME
    return read_json(path) if path.is_file() else None


def write_checkpoint(
    dest: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    source: Checkpoint,
    config: dict | None = None,
    extra_files: dict[str, dict] | None = None,
    manifest_extra: dict | None = None,
    force: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    weight_format: str = "safetensors",
) -> Path:
    """Write a whole checkpoint folder atomically.

    `tensors` may be a generator (streamed shard by shard); `config` replaces the
    source's config.json; `extra_files` are JSON files to add (e.g. quantize_config.json).
    """
    started = _dt.datetime.now(_dt.timezone.utc)
    dest = Path(dest)
    with atomic_output(dest, source=source.path, force=force) as tmp:
        copy_non_weight_files(source, tmp)
        writer = ShardedWriter(tmp, max_shard_size=max_shard_size, weight_format=weight_format)
        writer.add_all(tensors)
        writer.close()
        write_json(tmp / "config.json", config if config is not None else source.config)
        for name, obj in (extra_files or {}).items():
            write_json(tmp / name, obj)
        write_manifest(tmp, source=source, extra=manifest_extra, started=started)
    log.info("wrote %s", dest)
    return dest


def folder_size(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- streaming


_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


class StreamingShardWriter(ShardedWriter):
    """A `ShardedWriter` that holds no shard in memory: each tensor goes to disk on `add`.

    A safetensors header comes before the data it describes, so tensor bytes are appended
    to a `.data.partial` file and the shard is assembled (header, then the data copied in
    chunks) when it is full. Host memory is one tensor plus a copy buffer, whatever
    `max_shard_size` says; the price is writing each shard twice to disk (page cache,
    not process memory). Used for models that do not fit in host memory.
    """

    _COPY_CHUNK = 64 << 20

    def __init__(self, folder: Path, *, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE):
        super().__init__(folder, max_shard_size=max_shard_size, weight_format="safetensors")
        self._data = None  # open .data.partial file of the shard being written
        self._header: dict[str, dict] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._header and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self.folder / f"shard-{len(self._shards):05d}.data.partial", "wb")
        tensor = tensor.detach().to("cpu").contiguous()
        start = self._pending_bytes
        if nbytes:
            self._data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._header[name] = {"dtype": _SAFETENSORS_CODES[tensor.dtype],
                              "shape": list(tensor.shape),
                              "data_offsets": [start, start + nbytes]}
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if self._data is None:
            return
        data_path = Path(self._data.name)
        self._data.close()
        self._data = None
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
        tmp_name = f"shard-{len(self._shards):05d}.partial"
        with open(self.folder / tmp_name, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, self._COPY_CHUNK)
        data_path.unlink()
        self._shards.append((tmp_name, list(self._header)))
        self._header, self._pending_bytes = {}, 0

    def abort(self) -> None:
        """Close the open data file (the atomic folder around it removes the files)."""
        if self._data is not None:
            self._data.close()
            self._data = None


@dataclass
class CheckpointStream:
    """An output checkpoint being written tensor by tensor (see `checkpoint_stream`).

    Fill `config`, `extra_files` and `manifest_extra` before the `with` block ends; they
    are written after the last tensor, then the folder is renamed into place.
    """

    folder: Path
    writer: StreamingShardWriter
    config: dict | None = None
    extra_files: dict[str, dict] = field(default_factory=dict)
    manifest_extra: dict = field(default_factory=dict)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.writer.add_all(tensors)


@contextlib.contextmanager
def checkpoint_stream(dest: str | os.PathLike, *, source: Checkpoint, force: bool = False,
                      max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE
                      ) -> Iterator[CheckpointStream]:
    """`write_checkpoint` for producers that make tensors one at a time over a long run.

    The same rules hold: a temporary sibling folder, the source's non-weight files,
    config.json, the manifest, and a rename only when the block completes; an exception
    anywhere in the block (on this process or, through a collective, on another rank)
    leaves nothing behind.
    """
    started = _dt.datetime.now(_dt.timezone.utc)
    with atomic_output(dest, source=source.path, force=force) as tmp:
        copy_non_weight_files(source, tmp)
        stream = CheckpointStream(tmp, StreamingShardWriter(tmp, max_shard_size=max_shard_size))
        try:
            yield stream
        except BaseException:
            stream.writer.abort()
            raise
        stream.writer.close()
        write_json(tmp / "config.json", stream.config if stream.config is not None
                   else source.config)
        for name, obj in stream.extra_files.items():
            write_json(tmp / name, obj)
        write_manifest(tmp, source=source, extra=stream.manifest_extra, started=started)
    log.info("wrote %s", dest)
