"""How fast `quantkit gptq` runs end to end on a random model of a real shape, phase by phase.

    python bench/gptq_speed.py --shape baichuan2-7b --checkpoint /data/rand-7b \
        --out bench/results/gpu_gptq_7b_h200.json
    python bench/gptq_speed.py --shape tiny --device cpu --out bench/results/gptq_tiny_cpu.json

Random weights do not change time or memory, so a bf16 checkpoint with Baichuan2's shapes
in the Llama layout (ANCHORS.md) is written to `--checkpoint` first (kept and reused when it
is already there; `--build-only` stops after that). The clock then runs exactly what
`quantkit gptq CKPT --out DIR` runs, from the checkpoint on disk (load time counts) to the
artifact written: same engine, same defaults (128 x 2048 tokens, 4-bit, group 128,
true-sequential). Only the calibration text is replaced by random token ids.

Peak GPU memory is `torch.cuda.max_memory_allocated` over the run (and the reserved peak,
which is what `nvidia-smi` would show); peak host memory is the process's max RSS, which
includes building the checkpoint when this run built it (`built_here`).
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import emit_json  # noqa: E402
from quantkit.checkpoint import (  # noqa: E402
    ShardedWriter,
    atomic_output,
    parse_size,
    read_json,
    write_json,
)
from quantkit.gptq.run import GPTQConfig, gptq_quantize  # noqa: E402
from quantkit.gptq.timing import PhaseTimer  # noqa: E402
from quantkit.loading import resolve_device  # noqa: E402

log = logging.getLogger("gptq_speed")

# Llama-layout stand-ins for Baichuan2 (ANCHORS.md); `tiny` runs on a laptop CPU in seconds.
SHAPES = {
    "baichuan2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, vocab_size=125696, nsamples=128, seqlen=2048),
    "baichuan2-13b": dict(hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                          num_attention_heads=40, vocab_size=125696, nsamples=128,
                          seqlen=2048),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=3072, nsamples=16, seqlen=128),
}
# The tiny trained model's tokenizer (3072 tokens, fits every shape's vocabulary) goes into
# each checkpoint, so commands that read text (`quantkit bnb` checks its output on some)
# run on it too.
TOKENIZER = REPO / "quantkit" / "assets" / "tiny-baichuan2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def shape_config(shape: str):
    from transformers import LlamaConfig

    dims = {k: v for k, v in SHAPES[shape].items() if k not in ("nsamples", "seqlen")}
    return LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False,
                       dtype="bfloat16")


def _same_shape(folder: Path, config) -> bool:
    config_file = folder / "config.json"
    if not config_file.is_file() or not (folder / TOKENIZER_FILES[0]).is_file():
        return False
    stored = read_json(config_file)
    return all(stored.get(k) == getattr(config, k) for k in SHAPES["tiny"]
               if k not in ("nsamples", "seqlen"))


def build_random_checkpoint(shape: str, folder: Path, *, seed: int = 0,
                            device: str = "cpu") -> bool:
    """Write a random bf16 checkpoint of `shape` to `folder` unless one is already there.

    Tensors are drawn one at a time (on `device`: a GPU draws 7B normals in well under a
    second) and streamed into 5 GB shards, so host memory stays about one shard. Returns
    whether it built one.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = shape_config(shape)
    if _same_shape(folder, config):
        log.info("reusing the %s checkpoint in %s", shape, folder)
        return False
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    del model
    generator = torch.Generator(device=device).manual_seed(seed)

    def tensors():
        for name, size in shapes:
            if len(size) == 1:
                yield name, torch.ones(size, dtype=torch.bfloat16)  # norms
                continue
            value = torch.empty(size, dtype=torch.bfloat16, device=device)
            yield name, value.normal_(0.0, 0.02, generator=generator)

    with atomic_output(folder, force=folder.exists()) as tmp:
        writer = ShardedWriter(tmp, max_shard_size="5GB")
        writer.add_all(tensors())
        writer.close()
        write_json(tmp / "config.json", config.to_dict())
        for name in TOKENIZER_FILES:
            shutil.copyfile(TOKENIZER / name, tmp / name)
    return True


def run(args: argparse.Namespace) -> dict:
    shape = SHAPES[args.shape]
    nsamples = args.nsamples or shape["nsamples"]
    seqlen = args.seqlen or shape["seqlen"]
    device = resolve_device(args.device)
    on_cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="gptq-speed-") as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "source"
        build_start = time.perf_counter()
        built = build_random_checkpoint(args.shape, checkpoint, device=device)
        build_seconds = time.perf_counter() - build_start
        if args.build_only:
            return {"shape": args.shape, "checkpoint": str(checkpoint), "built_here": built,
                    "build_seconds": round(build_seconds, 3)}
        vocab = read_json(checkpoint / "config.json")["vocab_size"]
        input_ids = torch.randint(0, vocab, (nsamples, seqlen),
                                  generator=torch.Generator().manual_seed(1))
        dest = Path(args.artifact) if args.artifact else Path(tmp) / "artifact"
        cfg = GPTQConfig(source=checkpoint, dest=dest, nsamples=nsamples, seqlen=seqlen,
                         batch_size=args.batch_size, device=device, solver=args.solver,
                         max_gpu_memory=args.max_gpu_memory, force=True)
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = PhaseTimer(device)
        start = time.perf_counter()
        result = gptq_quantize(cfg, input_ids=input_ids, timer=timer)
        total = time.perf_counter() - start
        artifact_bytes = result.output_bytes
        layers = len(result.layers.layer_errors())
    return {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__,
        "triton_solve": _triton_solve(device),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "true_sequential": cfg.true_sequential,
        "solver": cfg.solver,
        "max_gpu_memory": args.max_gpu_memory,
        "checkpoint": str(checkpoint),
        "built_here": built,
        "build_seconds": round(build_seconds, 3),
        "total_seconds": round(total, 3),
        "phases_seconds": timer.rounded(),
        "seconds_per_layer": round(total / layers, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if on_cuda else None,
        "peak_gpu_reserved_gib": (round(torch.cuda.max_memory_reserved() / 2**30, 3)
                                  if on_cuda else None),
        "host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "artifact_bytes": artifact_bytes,
        "mean_error": result.manifest["mean_error"],
        "mean_rtn_error": result.manifest["mean_rtn_error"],
        "layer_errors": [round(e, 6) for _, e, _ in result.layers.layer_errors()],
    }


def _triton_solve(device: str) -> bool:
    """Whether the solve ran the Triton kernel (CUDA with a working Triton)."""
    from quantkit.gptq import solve_triton

    return solve_triton.usable(torch.device(device))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    parser.add_argument("--out", help="JSON file to write (stdout when omitted)")
    parser.add_argument("--checkpoint", help="where the random bf16 checkpoint is (built "
                        "there if missing; default: a temporary folder)")
    parser.add_argument("--build-only", action="store_true",
                        help="write the checkpoint and stop (so a later run only loads it)")
    parser.add_argument("--nsamples", type=int, help="calibration sequences (default: 128, "
                        "tiny: 16)")
    parser.add_argument("--seqlen", type=int, help="tokens per sequence (default: 2048, "
                        "tiny: 128)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--solver", default="fast", choices=["fast", "reference"])
    parser.add_argument("--max-gpu-memory", default=None,
                        help="e.g. 24GiB: keep activations in host memory if they do not fit")
    parser.add_argument("--artifact", help="keep the GPTQ folder here (default: discarded)")
    args = parser.parse_args(argv)
    if args.max_gpu_memory:
        parse_size(args.max_gpu_memory)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    emit_json(run(args), args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
