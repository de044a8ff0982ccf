"""Host memory and per-layer time of `quantkit gptq` on a model-sized checkpoint, on CPU.

    python bench/gptq_memory.py [--workdir /tmp/quantkit-gptq-memory] [--out JSON]

1. Builds (once, under --workdir, never in the repository) a random Llama with the shapes
   of a 1.2B model: hidden 2048, 20 layers, intermediate 5632, vocabulary 40000, untied
   head; 2.4 GB of bf16 safetensors in two shards. Values do not change time or memory.
2. Quantizes it in a fresh process (`gptq_quantize`, load="lazy", no --device cuda) and
   records the process's peak RSS: overall (getrusage of the child, the figure the target
   applies to), and per decoder layer (VmHWM, reset through /proc/self/clear_refs after
   each layer), next to the RSS after imports.
3. Runs the first --rank-layers layers of the same shape with 1 rank, then with 2 ranks
   under torchrun (gloo), both Hessian reduce modes, and reports seconds per layer.
4. Extrapolates the peak RSS of 7B- and 70B-shaped models from the measured per-layer
   figures (see `extrapolate`).

Writes one JSON (default bench/results/gptq_memory_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import status_kb  # noqa: E402

SHAPE_1B = dict(hidden=2048, layers=20, intermediate=5632, heads=16, kv_heads=16,
                vocab=40000)
SHAPES = {  # Llama-2 7B / 70B layouts (70B: grouped-query attention, 8 KV heads)
    "7B": dict(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32,
               vocab=32000),
    "70B": dict(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8,
                vocab=32000),
}
TARGET_BYTES = 1.6e9


# --------------------------------------------------------------------------- the model


def layer_params(shape: dict) -> int:
    h, i = shape["hidden"], shape["intermediate"]
    kv = h * shape["kv_heads"] // shape["heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def total_params(shape: dict) -> int:
    return shape["layers"] * layer_params(shape) + 2 * shape["vocab"] * shape["hidden"] + \
        shape["hidden"]


def build_model(dest: Path, shape: dict, *, shard: str = "1300MB") -> Path:
    """A random bf16 Llama checkpoint written tensor by tensor (never whole in memory)."""
    import torch
    from transformers import LlamaConfig

    from quantkit.checkpoint import StreamingShardWriter, write_json
    from quantkit.fixtures import build_tokenizer

    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    h, i = shape["hidden"], shape["intermediate"]
    kv = h * shape["kv_heads"] // shape["heads"]
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)

    def rand(*size):
        return (torch.randn(*size, generator=gen) * 0.02).bfloat16()

    writer = StreamingShardWriter(tmp, max_shard_size=shard)
    writer.add("model.embed_tokens.weight", rand(shape["vocab"], h))
    for n in range(shape["layers"]):
        p = f"model.layers.{n}."
        for name, size in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
                           ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
                           ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                           ("mlp.down_proj", (h, i))):
            writer.add(p + name + ".weight", rand(*size))
        writer.add(p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        writer.add(p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rand(shape["vocab"], h))
    writer.close()
    config_dict = config.to_dict()
    config_dict["architectures"] = ["LlamaForCausalLM"]
    write_json(tmp / "config.json", config_dict)
    build_tokenizer().save_pretrained(tmp)
    tmp.rename(dest)
    return dest


# --------------------------------------------------------------------------- the child


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def child(args) -> None:
    """One quantization in this (fresh) process; prints one JSON line."""
    import torch

    from quantkit.gptq.run import GPTQConfig, gptq_quantize

    import_rss = status_kb("VmRSS") * 1024
    layers: list[dict] = []

    def on_layer(index: int, seconds: float) -> None:
        layers.append({"layer": index, "seconds": round(seconds, 3),
                       "peak_rss": status_kb("VmHWM") * 1024,
                       "rss_after": status_kb("VmRSS") * 1024})
        _reset_peak()

    ids = torch.randint(3, 512, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    cfg = GPTQConfig(source=Path(args.model), dest=Path(args.dest), nsamples=args.nsamples,
                     seqlen=args.seqlen, device="cpu", force=True,
                     hessian_reduce=args.reduce, max_shard_size=args.max_shard_size)
    start = time.perf_counter()
    result = gptq_quantize(cfg, input_ids=ids, on_layer=on_layer)
    seconds = time.perf_counter() - start
    if result.is_main:
        print(json.dumps({"import_rss": import_rss, "seconds": round(seconds, 2),
                          "layers": layers, "phases": result.manifest["phases"],
                          "layer_seconds": result.manifest["layer_seconds"]}), flush=True)


# --------------------------------------------------------------------------- the parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(model: Path, dest: Path, args, *, ranks: int = 1, reduce: str = "allreduce"
              ) -> dict:
    """Run `child` in a fresh process (or under torchrun); return its JSON and peak RSS."""
    child_args = [str(Path(__file__).resolve()), "--child", "--model", str(model),
                  "--dest", str(dest), "--nsamples", str(args.nsamples), "--seqlen",
                  str(args.seqlen), "--reduce", reduce]
    if ranks == 1:
        cmd = [sys.executable, *child_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *child_args]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"child failed ({run.returncode}):\n{run.stderr[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    line = [x for x in run.stdout.splitlines() if x.startswith("{")][-1]
    out = json.loads(line)
    # ru_maxrss of children is the largest any child reached; only trust it when it grew.
    out["peak_rss_getrusage"] = peak if peak > before * 1024 else None
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def paper_terms(shape: dict, tokens: int) -> dict:
    """Bytes quantkit holds for one decoder layer, on paper (CPU, bf16 layers).

    layer: the decoder layer's weights in bf16 while it is processed; hessians: at the
    solve of the widest Linear, its float32 Hessian plus the two Hessian-sized temporaries
    of the Cholesky inverse (12 n^2; the float64 sum, 8 n^2, is freed by then);
    activations: the layer's inputs and outputs for every calibration token, in bf16;
    capture: the embedding matrix, memory-mapped and copied (read for the capture only).
    """
    widest = max(shape["hidden"], shape["intermediate"])
    return {"layer": 2 * layer_params(shape), "hessians": 12 * widest ** 2,
            "activations": 2 * 2 * tokens * shape["hidden"],
            "capture": 2 * 2 * shape["vocab"] * shape["hidden"]}


def extrapolate(measured: dict, tokens: int) -> dict:
    """Peak RSS of other shapes from the measured per-layer figures.

    Measured: the floor (RSS after each layer is released: imports, the meta skeleton,
    the calibration activations) and each layer's peak. The working set of a layer (median
    peak minus floor) minus its on-paper Hessian bytes, divided by the layer's bf16 bytes,
    is how many layer-sized buffers the run holds at its peak (the weights, their float32
    copies in the solver, the error metrics). Another shape's peak: the same imports, its
    activations, that many copies of its layer and its Hessian terms -- or, if larger, its
    capture (embedding read and copied).
    """
    floor = _median([x["rss_after"] for x in measured["layers"]])
    working = _median([x["peak_rss"] for x in measured["layers"][1:]]) - floor
    terms = paper_terms(SHAPE_1B, tokens)
    imports = floor - terms["activations"] / 2  # between layers only the inputs are held
    copies = (working - terms["hessians"] - terms["activations"] / 2) / terms["layer"]
    out = {"floor_rss": floor, "imports_rss": int(imports), "layer_working_set": working,
           "layer_copies": round(copies, 2)}
    for name, shape in SHAPES.items():
        for label, n_tokens in (("bench calibration", tokens),
                                ("128 x 2048 tokens", 128 * 2048)):
            t = paper_terms(shape, n_tokens)
            layer_peak = imports + t["activations"] + copies * t["layer"] + t["hessians"]
            capture_peak = imports + t["activations"] / 2 + t["capture"]
            out[f"{name}, {label}"] = {
                "params": total_params(shape), "bf16_bytes": 2 * total_params(shape),
                "peak_rss": int(max(layer_peak, capture_peak)), **t}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--reduce", default="allreduce", help=argparse.SUPPRESS)
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--workdir", default="/tmp/quantkit-gptq-memory")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--rank-layers", type=int, default=4,
                        help="layers of the 1-vs-2-rank timing model (same layer shape)")
    parser.add_argument("--skip-ranks", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" /
                                             "gptq_memory_cpu.json"))
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work / "llama-1.2b-shape", SHAPE_1B)
    source_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    tokens = args.nsamples * args.seqlen
    print(f"model: {total_params(SHAPE_1B) / 1e9:.3f} B parameters, {source_bytes / 1e9:.2f} GB",
          flush=True)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__, "cpus": os.cpu_count(),
        "model": {**SHAPE_1B, "params": total_params(SHAPE_1B), "bytes": source_bytes},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen},
    }
    if not args.skip_memory:
        memory = run_child(model, work / "out-1.2b", args)
        peak = memory["peak_rss_getrusage"] or max(x["peak_rss"] for x in memory["layers"])
        print(f"peak RSS {peak / 1e9:.3f} GB (target < {TARGET_BYTES / 1e9} GB), "
              f"{memory['seconds']} s", flush=True)
        result["memory"] = {**memory, "peak_rss": peak, "target": TARGET_BYTES,
                            "under_target": peak < TARGET_BYTES}
        result["extrapolated"] = extrapolate(memory, tokens)
    if not args.skip_ranks:
        small = build_model(work / f"llama-1.2b-shape-{args.rank_layers}-layers",
                            dict(SHAPE_1B, layers=args.rank_layers))
        ranks = {}
        for label, n, reduce in (("1 rank", 1, "allreduce"), ("2 ranks allreduce", 2,
                                                              "allreduce"),
                                 ("2 ranks owner", 2, "owner")):
            run = run_child(small, work / "out-ranks", args, ranks=n, reduce=reduce)
            ranks[label] = {"layer_seconds": run["layer_seconds"],
                            "mean_layer_seconds": round(sum(run["layer_seconds"]) /
                                                        len(run["layer_seconds"]), 3),
                            "phases": run["phases"], "seconds": run["seconds"]}
            print(f"{label}: {ranks[label]['mean_layer_seconds']} s per layer", flush=True)
        result["ranks"] = ranks
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
