"""Read and write Hugging Face checkpoint folders.

Every command goes through this module so that the rules hold everywhere: tensors are
read one at a time (memory-mapped safetensors, `weights_only` pickles), sources are never
modified, and outputs appear only when complete (written into a temporary sibling folder,
then renamed into place) with a `quantkit.json` manifest of what went in and came out.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.errors import CheckpointError, OutputError
from quantkit.secrets import redact

log = logging.getLogger(__name__)

MANIFEST_NAME = "quantkit.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "qwen.tiktoken")

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
            if p.name in skip or p.name.startswith("."):
                continue
            check_link_stays_inside(p, self.path)
            if not p.is_file():
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


def _hub_cache_root(folder: Path) -> Path | None:
    """`.../models--org--name` when `folder` is a Hugging Face cache snapshot, else None."""
    real = _real(folder)
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return None


def check_link_stays_inside(path: Path, folder: Path) -> None:
    """Refuse a symlink whose target leaves the model folder.

    Otherwise a link to a token file (or any file of the user's) would be copied into the
    artifact, listed as verified and uploaded by `push`. Links that stay inside the folder
    are copied as the files they point to. A Hugging Face cache snapshot's links into the
    same repository's `blobs/` count as inside: the cache stores every file that way.
    """
    if not path.is_symlink():
        return
    target = _real(path)
    roots = [_real(folder)] + [r for r in [_hub_cache_root(folder)] if r is not None]
    if not any(target == r or r in target.parents for r in roots):
        raise CheckpointError(f"{path}: a symlink to {target}, outside the model folder; "
                              "quantkit does not copy files from elsewhere into an output. "
                              "Replace the link by a copy of the file, or remove it")


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
    """A JSON object from `path`; any other content is one CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                              "restore or download the file again") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {exc.start}); restore or "
                              "download the file again") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(obj).__name__}, not an object "
                              "({...}); restore or download the file again")
    return obj


def _read_weight_map(path: Path) -> dict[str, str]:
    """The `weight_map` of a shard index: tensor name -> shard file name (a plain file name)."""
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: no usable weight_map (tensor name -> shard file); "
                              "restore or download the index again")
    for file_name in set(weight_map.values()):
        if Path(file_name).name != file_name or file_name in (".", ".."):
            raise CheckpointError(f"{path}: shard name {file_name!r} is not a file of the "
                                  "model folder; restore or download the index again")
    return dict(weight_map)


def _find_weights(folder: Path) -> tuple[str, dict[str, str]]:
    if (folder / SAFETENSORS_INDEX).is_file():
        return "safetensors", _read_weight_map(folder / SAFETENSORS_INDEX)
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        return "safetensors", _map_from_files(folder, singles, "safetensors")
    if (folder / BIN_INDEX).is_file():
        return "bin", _read_weight_map(folder / BIN_INDEX)
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
    except (struct.error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); download it again"
        ) from exc
    end = _check_header(path, header)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated ({size} bytes, header promises {8 + header_len + end}); "
            "download it again"
        )


def _check_header(path: Path, header) -> int:
    """Every entry names a known dtype, a shape and its byte range; returns the data size."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; download "
                              "the file again")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]
                and isinstance(shape, list) and all(isinstance(d, int) and d >= 0
                                                    for d in shape)):
            raise CheckpointError(f"{path}: tensor {name} has no valid shape and data_offsets "
                                  "in the safetensors header; download the file again")
        dtype = entry.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype!r}, which quantkit "
                                  f"does not read ({', '.join(_SAFETENSORS_DTYPES)})")
        end = max(end, offsets[1])
    return end


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
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _unsafe_pickle(path) from exc
    except RuntimeError:
        # Legacy (pre-zipfile) pickles cannot be memory-mapped; still weights_only.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _unsafe_pickle(path) from exc
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read PyTorch weights "
                                  f"({_first_line(exc)}); download it again") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read PyTorch weights safely "
                              f"({_first_line(exc)}); download it again") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors; pass a checkpoint saved "
                              "with save_pretrained")
    return state


def _unsafe_pickle(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: holds Python objects besides tensors; refused, because "
                           "loading it could run code. Get a safetensors copy from a source "
                           "you trust")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------- writing


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*1024**3, 1000 -> 1000 (Hugging Face units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = f"{size}B"
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.I)
    if not m:
        raise OutputError(f"--max-shard-size {size!r}: use a size like 5GB, 500MB or 2GiB")
    number, prefix, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    value = int(number * base ** " KMGT".index(prefix or " "))
    if value < 1:
        raise OutputError(f"--max-shard-size {size!r}: must be more than 0 bytes; use a size "
                          "like 5GB, 500MB or 2GiB")
    return value


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the output rule
#
# One rule for every command: an output never overlaps an input (not inside it, not
# containing it, not the same file, after resolving symlinks and `..`); it appears only
# when complete (a temporary sibling, then a rename); `--force` replaces only a previous
# quantkit output; and a full disk is one line naming the folder and the space needed.

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
REPORT_MARK = "<!-- written by quantkit -->"  # ends every markdown/HTML file quantkit writes
PNG_MARK = b"quantkit"  # in the PNG's Software text chunk


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def overlap(output: str | os.PathLike, input_path: str | os.PathLike) -> str | None:
    """How `output` overlaps `input_path` ('is', 'is inside', 'contains'), or None."""
    out, src = _real(output), _real(input_path)
    if out == src or (out.exists() and src.exists() and os.path.samefile(out, src)):
        return "is"
    if src in out.parents:
        return "is inside"
    if out in src.parents:
        return "contains"
    return None


def check_no_overlap(output: str | os.PathLike, inputs: Iterable, flag: str,
                     what: str = "input") -> None:
    """Refuse an output that is, is inside or contains one of the inputs."""
    for src in inputs:
        if src is None:
            continue
        how = overlap(output, src)
        if how:
            raise OutputError(f"{flag} {output}: {how} the {what} {src}; an output never "
                              "overlaps an input, write it elsewhere")


def is_quantkit_output(folder: Path) -> bool:
    """A folder `--force` may replace: one quantkit wrote (it carries quantkit.json)."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file() or manifest.is_symlink():
        return False
    try:
        return read_json(manifest).get("tool") == "quantkit"
    except CheckpointError:
        return False


def is_quantkit_file(path: Path) -> bool:
    """A result file quantkit may replace: eval/mem JSON, a report, a plot it wrote."""
    try:
        if path.suffix == ".png":
            with open(path, "rb") as f:
                return PNG_MARK in f.read(4096)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix in (".md", ".html"):
        return REPORT_MARK in text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("kind") in ("eval", "mem")


def remove_stale_temps(dest: Path) -> None:
    """Remove `.DEST.tmp-PID-*` (and `.old-`) leftovers of processes that no longer run.

    A SIGKILL or a power cut skips every cleanup; the next run of any command writing
    next to them takes them away, leaving those of live processes alone.
    """
    parent = dest.parent
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        m = _TEMP_RE.match(p.name)
        if not m or m.group("name") != dest.name or _pid_alive(int(m.group("pid"))):
            continue
        log.info("removing %s, left by process %s that is gone", p, m.group("pid"))
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name(dest: Path, kind: str = "tmp") -> Path:
    return dest.parent / f".{dest.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC, however the writing library reports it (safetensors, torch, plain OSError)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text or "Disk quota" in text:
        return True
    # torch.save reports a short write as "unexpected pos ..." without the errno.
    if isinstance(exc, RuntimeError) and "inline_container" in text:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < 64 << 20
    return False


def disk_full_error(folder: Path, written: int, needed: int | None) -> OutputError:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    total = max(needed or 0, written)
    need = (f"needs about {_mb(total)}" if needed else f"needs more than {_mb(written)}")
    return OutputError(f"{folder}: no space left on the device; the output {need} and "
                       f"{_mb(free)} is free; free space or choose another destination "
                       "(nothing was written)")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Files 0666 and folders 0777 minus the umask: safetensors creates its files 0600."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def _publish_when_done(tmp: Path, folder: Path, needed_bytes: int | None, *,
                       publish: Callable[[], None], discard: Callable[[], None]
                       ) -> Iterator[None]:
    """The one rule of atomic_output and atomic_file: the block writes `tmp`; on success it
    gets the umask's modes and `publish` renames it into place, on any exception (Ctrl-C
    and SIGTERM included) `discard` removes it, and a full disk becomes one line."""
    try:
        try:
            yield
            apply_umask(tmp)
        except Exception as exc:
            if is_disk_full(exc, folder):
                raise disk_full_error(folder, _tree_bytes(tmp), needed_bytes) from exc
            raise
        publish()
    except BaseException:
        discard()
        raise


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike, *, source: str | os.PathLike | None = None,
                  inputs: Iterable = (), force: bool = False, flag: str = "--out",
                  needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `dest` only if the block completes.

    Any exception (Ctrl-C and SIGTERM included) removes the temporary folder, so a failed
    run leaves nothing behind and an existing `dest` is untouched.
    """
    dest = Path(dest).absolute()
    check_destination(dest, source=source, inputs=inputs, force=force, flag=flag)
    remove_stale_temps(dest)
    tmp = _temp_name(dest)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"{dest.parent}: cannot write here ({exc.strerror}); "
                          f"choose another {flag}") from exc
    with _publish_when_done(tmp, dest.parent, needed_bytes,
                            publish=lambda: _replace_folder(tmp, dest),
                            discard=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp


def check_file_destination(dest: str | os.PathLike, flag: str = "--out",
                           inputs: Iterable = ()) -> Path:
    """A single output file (result JSON, report, plot): not an input, not inside one, in a
    writable folder, and replacing only a file quantkit wrote."""
    dest = Path(dest).absolute()
    check_no_overlap(dest, inputs, flag)
    if dest.is_dir():
        raise OutputError(f"{flag} {dest}: is a folder; pass a file path")
    if not dest.parent.is_dir():
        raise OutputError(f"{flag} {dest}: no folder {dest.parent}; create it first")
    if not os.access(dest.parent, os.W_OK):
        raise OutputError(f"{flag} {dest}: {dest.parent} is not writable; choose another path")
    if dest.is_symlink():
        raise OutputError(f"{flag} {dest}: is a symlink; pass the path of a new file")
    if dest.exists() and not is_quantkit_file(dest):
        raise OutputError(f"{flag} {dest}: exists and is not a file quantkit wrote; quantkit "
                          "replaces only its own results, so choose another path or remove it")
    return dest


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, flag: str = "--out", inputs: Iterable = ()
                ) -> Iterator[Path]:
    """Yield a temporary sibling path; it replaces `dest` only if the block completes."""
    dest = check_file_destination(dest, flag, inputs)
    remove_stale_temps(dest)
    tmp = _temp_name(dest)
    with _publish_when_done(tmp, dest.parent, None, publish=lambda: os.replace(tmp, dest),
                            discard=lambda: tmp.unlink(missing_ok=True)):
        yield tmp


def check_destination(dest: Path, *, source: str | os.PathLike | None = None,
                      inputs: Iterable = (), force: bool, flag: str = "--out") -> None:
    """Refuse an output overlapping an input, an existing one (unless forced and quantkit's
    own), a symlink, or one without a writable parent folder."""
    dest = Path(dest).absolute()
    check_no_overlap(dest, [source], flag, "source")
    check_no_overlap(dest, inputs, flag)
    if dest.is_symlink():
        raise OutputError(f"{flag} {dest}: is a symlink; pass the real folder or a new path")
    if dest.exists() and not force:
        raise OutputError(f"{flag} {dest}: already exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{flag} {dest}: exists and is not a folder; choose another {flag}")
    if dest.exists() and any(dest.iterdir()) and not is_quantkit_output(dest):
        raise OutputError(f"{flag} {dest}: holds files quantkit did not write (no "
                          f"{MANIFEST_NAME}); --force replaces only a previous quantkit "
                          f"output, so choose another {flag} or empty it yourself")
    if not dest.parent.is_dir():
        raise OutputError(f"{flag} {dest}: no such folder {dest.parent}; create it first")
    if not os.access(dest.parent, os.W_OK):
        raise OutputError(f"{flag} {dest}: {dest.parent} is not writable; choose another "
                          f"{flag}")


def _replace_folder(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = _temp_name(dest, "old")
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
        "command": redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
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


def write_text_atomic(path: Path, text: str) -> None:
    """A file of quantkit's own (run state, recipe copy) that is either the old one or the
    new one, never half of either."""
    tmp = _temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
    flag: str = "--out",
) -> Path:
    """Write a whole checkpoint folder atomically.

    `tensors` may be a generator (streamed shard by shard); `config` replaces the
    source's config.json; `extra_files` are JSON files to add (e.g. quantize_config.json).
    """
    started = _dt.datetime.now(_dt.timezone.utc)
    dest = Path(dest)
    with atomic_output(dest, source=source.path, force=force, flag=flag,
                       needed_bytes=source_weight_bytes(source)) as tmp:
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


def source_weight_bytes(source: Checkpoint) -> int:
    """What a disk-full message quotes as the space an output needs: the source's weights."""
    return sum((source.path / f).stat().st_size for f in source.weight_files)


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
    with atomic_output(dest, source=source.path, force=force,
                       needed_bytes=source_weight_bytes(source)) as tmp:
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
