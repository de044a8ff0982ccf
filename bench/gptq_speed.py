"""How fast quantkit's GPTQ runs on a random model of a real shape, phase by phase.

    python bench/gptq_speed.py --shape baichuan2-7b --out bench/results/gptq_7b_h100.json
    python bench/gptq_speed.py --shape tiny --out bench/results/gptq_tiny_cpu.json

Random weights do not change time or memory, so the model is built in host memory with
Baichuan2's shapes in the Llama layout (ANCHORS.md) -- each weight allocated once, on the
meta device first -- and quantized exactly as `quantkit gptq` does after loading: same
engine, same defaults (128 x 2048 tokens, 4-bit, group 128, true-sequential), artifact
written. The clock runs from the model in host memory to the artifact on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from quantkit.checkpoint import Checkpoint, parse_size, write_json  # noqa: E402
from quantkit.families import family_for  # noqa: E402
from quantkit.gptq.run import GPTQConfig, quantize_and_write  # noqa: E402
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
                 num_attention_heads=4, vocab_size=512, nsamples=16, seqlen=128),
}


def build_random_model(shape: str, seed: int = 0):
    """A Llama model of `shape` in bf16 host memory, each weight allocated exactly once."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    dims = {k: v for k, v in SHAPES[shape].items() if k not in ("nsamples", "seqlen")}
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False,
                         dtype="bfloat16")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = torch.empty(param.shape, dtype=torch.bfloat16)
        if param.dim() == 1:
            value.fill_(1.0)  # norms
        else:
            value.normal_(0.0, 0.02, generator=generator)
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    return model.eval(), config


def run(args: argparse.Namespace) -> dict:
    shape = SHAPES[args.shape]
    nsamples = args.nsamples or shape["nsamples"]
    seqlen = args.seqlen or shape["seqlen"]
    device = resolve_device(args.device)
    build_start = time.perf_counter()
    model, config = build_random_model(args.shape)
    build_seconds = time.perf_counter() - build_start
    input_ids = torch.randint(0, config.vocab_size, (nsamples, seqlen),
                              generator=torch.Generator().manual_seed(1))

    with tempfile.TemporaryDirectory(prefix="gptq-speed-") as tmp:
        source_dir = Path(tmp) / "source"
        source_dir.mkdir()
        config_dict = config.to_dict()
        write_json(source_dir / "config.json", config_dict)
        source = Checkpoint(path=source_dir, config=config_dict, weight_format="safetensors",
                            weight_map={})
        dest = Path(args.artifact) if args.artifact else Path(tmp) / "artifact"
        cfg = GPTQConfig(source=source_dir, dest=dest, nsamples=nsamples, seqlen=seqlen,
                         batch_size=args.batch_size, device=device, solver=args.solver,
                         max_gpu_memory=args.max_gpu_memory, force=True)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        timer = PhaseTimer(device)
        start = time.perf_counter()
        result = quantize_and_write(model, input_ids, source, model.state_dict().items(), cfg,
                                    device=device, family=family_for(config_dict), timer=timer)
        total = time.perf_counter() - start
        artifact_bytes = result.output_bytes

    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    phases = timer.rounded()
    phases.pop("load", None)  # the model is built in memory, not loaded
    return {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "true_sequential": cfg.true_sequential,
        "solver": cfg.solver,
        "max_gpu_memory": args.max_gpu_memory,
        "build_seconds": round(build_seconds, 3),
        "total_seconds": round(total, 3),
        "phases_seconds": phases,
        "seconds_per_layer": round(total / config.num_hidden_layers, 3),
        "peak_gpu_gib": round(peak_gpu, 3) if peak_gpu is not None else None,
        "host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "artifact_bytes": artifact_bytes,
        "mean_error": result.manifest["mean_error"],
        "mean_rtn_error": result.manifest["mean_rtn_error"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    parser.add_argument("--out", help="JSON file to write (stdout when omitted)")
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
    results = run(args)
    text = json.dumps(results, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
        log.info("wrote %s", out)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
