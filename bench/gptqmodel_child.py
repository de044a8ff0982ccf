"""GPTQModel's side of bench/quality.py; runs inside the interop venv, not quantkit's.

Quantizes with GPTQModel 7.6.0's defaults (only bits, group size and sym set) on the token
ids bench/quality.py wrote, saves the checkpoint, and reports seconds and peak RSS. Two
settings that do not change the result are fixed: offload_to_disk=False keeps its scratch
out of /tmp and pack_impl="original" is its pure-torch packer (the default JIT-compiles a
C++ one first). `--skip` leaves decoder Linears unquantized through GPTQModel's own
`dynamic` negative patterns, the same regexes quantkit writes for --skip-modules.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from common import peak_rss_bytes  # bench/common.py: this script's folder is sys.path[0]


def _skip_module():
    """quantkit/gptq/skip.py on its own (stdlib only): this venv has no quantkit on its
    path, and the patterns must be the ones quantkit writes."""
    path = Path(__file__).resolve().parents[1] / "quantkit" / "gptq" / "skip.py"
    spec = importlib.util.spec_from_file_location("quantkit_skip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--skip", default="", help="comma-separated Linear names to skip")
    args = parser.parse_args()

    from gptqmodel import GPTQModel, QuantizeConfig

    ids = torch.load(args.ids)
    calibration = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])}
                   for row in ids]
    t0 = time.perf_counter()
    skip = _skip_module()
    dynamic = skip.dynamic_exclusions(skip.parse_skip_modules(args.skip)) or None
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True,
                            offload_to_disk=False, pack_impl="original", dynamic=dynamic)
    model = GPTQModel.load(args.model, config, device="cpu")
    model.quantize(calibration)
    model.save(args.out)
    seconds = time.perf_counter() - t0
    qcfg = json.loads((Path(args.out) / "config.json").read_text()).get("quantization_config")
    args.report.write_text(json.dumps({
        "seconds": seconds,
        "peak_rss_gb": peak_rss_bytes() / 2**30, "peak_rss_source": "VmHWM",
        "settings": qcfg,
        "compute_dtype": str(next(model.model.parameters()).dtype).replace("torch.", ""),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
