"""`quantkit eval --tasks ppl,kld` time, before and after, in one run on one machine.

    python bench/eval_speed.py --model GPTQ_DIR --base BF16_DIR --old-tree /tmp/quantkit-0.1.0
        [--max-tokens 32768]

Runs the same eval twice as child processes -- once with the old source tree first on
PYTHONPATH (e.g. `git archive <commit> | tar -x -C DIR`), once with this checkout -- on the
same model, base and held-out tokens, alternating so machine load hits both alike. With
--max-tokens below the full 64k a run is partial; the JSON gives seconds per scored window
and the 64k-token estimate from it (128 windows of 512), and says which it is.

`--isa native,AVX2` repeats the pair with oneDNN capped at each instruction set
(ONEDNN_MAX_CPU_ISA): AVX2 has no bf16 dot products, so an AVX512-BF16 machine then
multiplies bf16 the way a CPU without native bf16 does (issue 13's machine: 16.7 GFLOPS
bf16 against 77.9 fp32), and the new code's compute dtype follows (quantkit.compute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FULL_TOKENS = 65536


def eval_once(tree: Path, args, out: Path, isa: str = "native") -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    cmd = [sys.executable, "-m", "quantkit", "-q", "eval", str(args.model), "--base",
           str(args.base), "--tasks", "ppl,kld", "--seqlen", str(args.seqlen),
           "--max-tokens", str(args.max_tokens), "--device", "cpu", "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=tree)
    seconds = time.perf_counter() - t0
    result = json.loads(out.read_text())
    windows = sum(v.get("windows", 0) for v in result["results"]["ppl"].values())
    tokens = sum(v["tokens"] for v in result["results"]["ppl"].values())
    return {"tree": str(tree), "seconds": seconds, "eval_seconds": result["seconds"],
            "windows": windows, "scored_tokens": tokens,
            "compute_dtype": result["settings"].get("compute_dtype", "as stored (bf16)"),
            "ppl": {k: v["ppl"] for k, v in result["results"]["ppl"].items()},
            "kld_mean": {k: v["mean"] for k, v in result["results"]["kld"].items()},
            "seconds_per_window": seconds / windows,
            "estimate_64k_tokens_s": seconds / windows * FULL_TOKENS / args.seqlen}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=FULL_TOKENS // 2,
                        help="per held-out language (zh and en): 32768 is the full 64k")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--isa", default="native",
                        help="comma-separated: native and/or oneDNN ISA caps such as AVX2")
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / "eval_speed_cpu.json")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for isa in args.isa.split(","):
            new = eval_once(REPO, args, Path(tmp) / f"new-{isa}.json", isa)
            old = eval_once(args.old_tree, args, Path(tmp) / f"old-{isa}.json", isa)
            runs[isa] = {"old": old, "new": new,
                         "speedup": old["seconds_per_window"] / new["seconds_per_window"]}
    from quantkit.checkpoint import write_json
    from quantkit.compute import cpu_has_native_bf16

    write_json(args.out, {
        "kind": "eval_speed",
        "command": " ".join(["python", "bench/eval_speed.py", *sys.argv[1:]]),
        "partial": 2 * args.max_tokens < FULL_TOKENS,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "native_bf16": cpu_has_native_bf16()},
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
