"""What the calibration set does to a GPTQ model: plain prose, chat rows, and the mixed set.

    python bench/calibration_compare.py --model DIR --out bench/results/calib_smollm2.json
    python bench/calibration_compare.py --model quantkit/assets/tiny-baichuan2 \\
        --trust-remote-code --calibrations classic,text --group-size 128 --nsamples 64 \\
        --seqlen 256 --out bench/results/calib_tiny_baichuan2.json

The model is quantized once per calibration on identical settings (bits, group size,
nsamples x seqlen, seed), and each result is scored against the unquantized model on the
same held-out token windows: perplexity and KL divergence on plain held-out prose and, when
the tokenizer has a chat template, on held-out conversations rendered with it -- the text
chat users send. Calibrations are quantkit.data formats: `text` (prose), `chat`, `mixed`
(the default candidate for chat models) and `classic` (the set quantkit shipped before).
Every figure comes from quantkit's own engine and evaluation code.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from quantkit.chat_calib import has_chat_template  # noqa: E402
from quantkit.checkpoint import open_checkpoint, write_json_atomic  # noqa: E402
from quantkit.data import build_calibration, heldout_tokens  # noqa: E402
from quantkit.evaluate.kld import KldTotal  # noqa: E402
from quantkit.evaluate.perplexity import (  # noqa: E402
    NllTotal,
    iter_batches,
    token_nll,
    window_logits,
)
from quantkit.gptq.run import GPTQConfig, gptq_quantize, load_source_model  # noqa: E402
from quantkit.loading import load_tokenizer  # noqa: E402

log = logging.getLogger("calibration_compare")


def heldout_streams(tokenizer, *, plain_sources: tuple[str, ...], tokens: int
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """{"plain": {"zh-modern": ids, ...}, "chat": {"zh-chat": ids, ...}}, each cut to
    `tokens` tokens (whole windows of the same ids for every calibration)."""
    kinds = {"plain": heldout_tokens(tokenizer, sources=plain_sources)}
    if has_chat_template(tokenizer):
        kinds["chat"] = heldout_tokens(tokenizer, text_format="chat")
    return {kind: {k: v[:tokens] for k, v in streams.items()} for kind, streams in kinds.items()}


def score_all(models: dict[str, torch.nn.Module], base: torch.nn.Module,
              streams: dict[str, dict[str, torch.Tensor]], *, seqlen: int, batch_size: int
              ) -> dict[str, dict]:
    """{name: {kind: ppl, KLD from base, per text}} for base ("bf16") and every model.

    One pass over the windows: the base's logits are computed once per batch and every
    quantized model is scored against them (the expensive part on a CPU is the forward).
    """
    names = ["bf16", *models]
    out: dict[str, dict] = {name: {} for name in names}
    for kind, texts in streams.items():
        totals = {name: {} for name in names}
        for text, ids in texts.items():
            nll = {name: NllTotal() for name in names}
            kld = {name: KldTotal() for name in models}
            for batch in tqdm(list(iter_batches(ids, seqlen, seqlen, batch_size)), desc=text,
                              unit="batch", leave=False):
                with torch.no_grad():
                    base_logits, targets = window_logits(base, ids, batch)
                    nll["bf16"].add(token_nll(base_logits, targets))
                    for name, model in models.items():
                        logits, _ = window_logits(model, ids, batch)
                        nll[name].add(token_nll(logits, targets))
                        kld[name].add(base_logits, logits)
            for name in names:
                totals[name][text] = (nll[name], kld.get(name))
        for name in names:
            per_text = {}
            for text, (n, k) in totals[name].items():
                per_text[text] = {"ppl": n.summary()["ppl"], "tokens": n.tokens, **_kld(k)}
            nll_sum = sum(n.nll_sum for n, _ in totals[name].values())
            count = sum(n.tokens for n, _ in totals[name].values())
            klds = [k for _, k in totals[name].values() if k is not None]
            merged = None
            for k in klds:
                merged = k if merged is None else merged.merged(k)
            out[name][kind] = {"ppl": math.exp(nll_sum / count), **_kld(merged),
                               "tokens": count, "texts": per_text}
    return out


def _kld(total: KldTotal | None) -> dict:
    if total is None:
        return {}
    summary = total.summary()
    return {"kld_mean": summary["mean"], "kld_p99": summary["p99"],
            "same_top1": summary["same_top1"]}


def compare_calibrations(model_dir: str | Path, *, bits: int = 4, group_size: int = 64,
                         nsamples: int = 32, seqlen: int = 512, out_json: str | Path | None,
                         calibrations: tuple[str, ...] | None = None,
                         plain_sources: tuple[str, ...] = ("modern",),
                         eval_windows: int = 10, batch_size: int = 2, device: str = "cpu",
                         trust_remote_code: bool = False, seed: int = 0) -> dict:
    """Quantize `model_dir` once per calibration and score each; write `out_json`.

    Default calibrations: text, chat, mixed for a tokenizer with a chat template, else
    classic and text. `eval_windows` windows of `seqlen` tokens per held-out text.
    """
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    chat = has_chat_template(tokenizer)
    calibrations = calibrations or (("text", "chat", "mixed") if chat else ("classic", "text"))
    streams = heldout_streams(tokenizer, plain_sources=plain_sources,
                              tokens=eval_windows * seqlen)
    base = load_source_model(open_checkpoint(model_dir), trust_remote_code).float().eval()
    settings = {"bits": bits, "group_size": group_size, "nsamples": nsamples,
                "seqlen": seqlen, "seed": seed, "device": device,
                "eval_windows_per_text": eval_windows, "plain_sources": list(plain_sources)}
    results = {"model": str(model_dir), "settings": settings, "calibrations": {}}
    quantized = {}
    for fmt in calibrations:
        t0 = time.perf_counter()
        calib = build_calibration(tokenizer, fmt=fmt, nsamples=nsamples, seqlen=seqlen,
                                  seed=seed)
        with tempfile.TemporaryDirectory(prefix="quantkit-calib-compare-") as tmp:
            cfg = GPTQConfig(source=model_dir, dest=Path(tmp) / "gptq", bits=bits,
                             group_size=group_size, nsamples=nsamples, seqlen=seqlen,
                             device=device, trust_remote_code=trust_remote_code, seed=seed)
            result = gptq_quantize(cfg, input_ids=calib.ids)
        quantized[fmt] = result.model.float().eval()
        results["calibrations"][fmt] = {
            "report": calib.report, "mean_error": result.manifest["mean_error"],
            "mean_rtn_error": result.manifest["mean_rtn_error"],
            "quantize_seconds": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    scores = score_all(quantized, base, streams, seqlen=seqlen, batch_size=batch_size)
    results["eval_seconds"] = round(time.perf_counter() - t0, 1)
    results["bf16"] = scores["bf16"]
    for fmt in calibrations:
        results["calibrations"][fmt].update(scores[fmt])
        log.info("%s: %s", fmt, ", ".join(f"{k} ppl {v['ppl']:.3f} kld {v['kld_mean']:.5f}"
                                          for k, v in scores[fmt].items()))
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out_json), results)
    return results


def summary_lines(results: dict) -> list[str]:
    kinds = list(results["bf16"])
    head = "| calibration | " + " | ".join(f"{k} ppl | {k} KLD" for k in kinds) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(kinds))]
    lines.append("| bf16 | " + " | ".join(f"{results['bf16'][k]['ppl']:.3f} | -"
                                          for k in kinds) + " |")
    for fmt, r in results["calibrations"].items():
        lines.append(f"| {fmt} | " + " | ".join(f"{r[k]['ppl']:.3f} | {r[k]['kld_mean']:.5f}"
                                               for k in kinds) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="BF16 checkpoint folder")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--calibrations", help="comma-separated quantkit.data formats "
                        "[default: text,chat,mixed with a chat template, else classic,text]")
    parser.add_argument("--plain-sources", default="modern",
                        help="held-out prose: classic and/or modern, comma-separated")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=10,
                        help="windows of --seqlen tokens per held-out text")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = compare_calibrations(
        args.model, bits=args.bits, group_size=args.group_size, nsamples=args.nsamples,
        seqlen=args.seqlen, out_json=args.out,
        calibrations=tuple(args.calibrations.split(",")) if args.calibrations else None,
        plain_sources=tuple(args.plain_sources.split(",")), eval_windows=args.eval_windows,
        device=args.device, trust_remote_code=args.trust_remote_code)
    sys.stdout.write("\n".join(summary_lines(results)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
