"""GPTQModel's side of bench/quality.py; runs inside the interop venv, not quantkit's.

Quantizes with GPTQModel 7.6.0's defaults (only bits, group size and sym set) on the token
ids bench/quality.py wrote, saves the checkpoint, and reports seconds and peak RSS. Two
settings that do not change the result are fixed: offload_to_disk=False keeps its scratch
out of /tmp and pack_impl="original" is its pure-torch packer (the default JIT-compiles a
C++ one first).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()

    from gptqmodel import GPTQModel, QuantizeConfig

    ids = torch.load(args.ids)
    calibration = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])}
                   for row in ids]
    t0 = time.perf_counter()
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True,
                            offload_to_disk=False, pack_impl="original")
    model = GPTQModel.load(args.model, config, device="cpu")
    model.quantize(calibration)
    model.save(args.out)
    seconds = time.perf_counter() - t0
    qcfg = json.loads((Path(args.out) / "config.json").read_text()).get("quantization_config")
    args.report.write_text(json.dumps({
        "seconds": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "settings": qcfg,
        "compute_dtype": str(next(model.model.parameters()).dtype).replace("torch.", ""),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
