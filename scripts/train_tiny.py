"""Train quantkit's tiny demo model: a Baichuan2-7B-layout LM that actually learned text.

Random-weight fixtures show that quantization runs; only a trained model shows what it
costs (perplexity, KL divergence). This script trains one small enough to ship in the
repository (bf16, under 10 MB) on calib_data/train, deterministically on CPU:

1. a byte-level BPE tokenizer on the train split (both languages);
2. a Baichuan2-7B-layout model (RoPE, W_pack, NormHead) in float32 with AdamW and a
   cosine schedule, each batch half Chinese and half English windows;
3. the checkpoint saved in bf16 as a remote-code folder (quantkit.remote_code), loaded
   back with trust_remote_code, and scored on calib_data/heldout (non-overlapping windows);
4. TRAINING.md recording the command, time, loss and held-out perplexities.

    python scripts/train_tiny.py --steps 2000 --threads 2 --out quantkit/assets/tiny-baichuan2

Every Linear's in-features are a multiple of 128 and out-features a multiple of 32, so
GPTQ with group size 128 and 2/3/4/8-bit packing apply to all of them.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quantkit.checkpoint import atomic_output, folder_size  # noqa: E402
from quantkit.fixtures import build_tokenizer  # noqa: E402
from quantkit.remote_code import BaichuanForCausalLM, baichuan2_config, save_baichuan2  # noqa: E402

log = logging.getLogger("train_tiny")
LANGUAGES = ("zh", "en")


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    steps: int
    threads: int
    seed: int = 0
    vocab_size: int = 3072
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    seqlen: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    log_every: int = 20
    save_every: int = 50


def read_split(data: Path, split: str) -> dict[str, str]:
    texts = {}
    for lang in LANGUAGES:
        path = data / split / f"{lang}.txt"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; build calib_data first")
        texts[lang] = path.read_text(encoding="utf-8")
    return texts


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long token stream; lines are encoded in a batch (fast) and keep their newline."""
    lines = text.splitlines(keepends=True)
    encoded = tokenizer(lines, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for ids in encoded for t in ids], dtype=torch.long)


def sample_batch(streams: dict[str, torch.Tensor], cfg: TrainConfig,
                 gen: torch.Generator) -> torch.Tensor:
    """Half the windows from each language, at random offsets."""
    rows = []
    for i in range(cfg.batch_size):
        stream = streams[LANGUAGES[i % len(LANGUAGES)]]
        start = int(torch.randint(0, len(stream) - cfg.seqlen, (1,), generator=gen))
        rows.append(stream[start:start + cfg.seqlen])
    return torch.stack(rows)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norm weights do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95))


@dataclass
class TrainResult:
    loss: float  # mean train loss of the last 50 steps
    seconds: float  # wall time of the optimizer steps, summed over resumed runs
    resumed: int  # how many times training continued from a saved state


def _state_key(cfg: TrainConfig) -> dict:
    """What a saved state must match to be resumed (paths as text: weights_only loading)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def train(model: torch.nn.Module, streams: dict[str, torch.Tensor], cfg: TrainConfig,
          state_path: Path) -> TrainResult:
    """Run cfg.steps optimizer steps, saving a resumable state every `save_every` steps.

    On a shared machine a long run may be killed; rerunning the same command continues
    from the saved state (model, optimizer, sampler RNG, step) and ends with exactly the
    weights an uninterrupted run would have.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    start, recent, seconds, resumed = 0, [], 0.0, 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        if state["config"] == _state_key(cfg):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            start, recent, seconds = state["step"], state["recent"], state["seconds"]
            resumed = state["resumed"] + 1
            log.info("resuming from %s at step %d", state_path, start)
    model.train()
    started = time.perf_counter() - seconds
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = sample_batch(streams, cfg, gen)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
        elapsed = time.perf_counter() - started
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.info("step %d/%d  loss %.3f  lr %.2e  %.0f tokens/s  %.0fs", step + 1, cfg.steps,
                     loss.item(), lr_at(step, cfg),
                     (step + 1 - start) * cfg.batch_size * cfg.seqlen / (elapsed - seconds),
                     elapsed)
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"config": _state_key(cfg), "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                        "step": step + 1, "recent": recent, "seconds": elapsed,
                        "resumed": resumed}, tmp)
            tmp.replace(state_path)
    return TrainResult(sum(recent) / len(recent), time.perf_counter() - started, resumed)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int) -> float:
    """exp(mean NLL) over non-overlapping seqlen windows (each window's first token unscored)."""
    n_windows = len(ids) // seqlen
    if n_windows == 0:
        raise ValueError(f"{len(ids)} tokens: fewer than one {seqlen}-token window")
    total, count = 0.0, 0
    for window in ids[: n_windows * seqlen].view(n_windows, seqlen).split(8):
        logits = model(input_ids=window, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), window[:, 1:].flatten(), reduction="sum").item()
        count += window[:, 1:].numel()
    return math.exp(total / count)


def training_md(cfg: TrainConfig, command: str, n_params: int, size: int, result: TrainResult,
                train_tokens: dict[str, int], ppl: dict[str, float],
                heldout_tokens: dict[str, int]) -> str:
    settings = "\n".join(f"| {k} | {v} |" for k, v in asdict(cfg).items()
                         if k not in ("data", "out", "save_every"))
    resumed = ("one uninterrupted run" if result.resumed == 0 else
               f"resumed {result.resumed} time(s) after interruptions")
    rows = "\n".join(f"| {lang} | {heldout_tokens[lang]:,} | {ppl[lang]:.2f} |"
                     for lang in LANGUAGES)
    return f"""# tiny-baichuan2: how it was made

A Baichuan2-7B-layout model (RoPE, fused `W_pack`, NormHead `lm_head`, remote code via
`auto_map`) trained from scratch on CPU on `calib_data/train`, so quantization costs
(perplexity, KL divergence) can be measured on a model that learned something.

Command (from the repository root, {torch.get_num_threads()} CPU threads):

    {command}

- parameters: {n_params:,}; folder size on disk: {size / 1e6:.2f} MB (weights in bf16)
- training: {cfg.steps} steps x {cfg.batch_size} x {cfg.seqlen} tokens
  ({cfg.steps * cfg.batch_size * cfg.seqlen:,} tokens, half zh / half en windows), float32,
  AdamW, cosine schedule; {result.seconds / 60:.1f} min of training wall time on a shared
  machine (torch {torch.__version__}; {resumed})
- train tokens available: zh {train_tokens['zh']:,}, en {train_tokens['en']:,}
- final train loss (mean of the last 50 steps): {result.loss:.3f}
- tokenizer: byte-level BPE, vocab {cfg.vocab_size}, trained on the train split
  (`<unk>`=0, `<s>`=1, `</s>`=2, pad = `</s>`)

Held-out perplexity of the saved bf16 checkpoint (`calib_data/heldout`, non-overlapping
{cfg.seqlen}-token windows, loaded with `trust_remote_code=True`):

| split | tokens | perplexity |
|---|---|---|
{rows}

Chance level is the vocabulary size ({cfg.vocab_size}).

| setting | value |
|---|---|
{settings}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "quantkit/assets/tiny-baichuan2")
    parser.add_argument("--data", type=Path, default=REPO / "calib_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state", type=Path,
                        default=Path(tempfile.gettempdir()) / "quantkit-train-tiny.state.pt",
                        help="resumable training state; rerun the same command to continue")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(data=args.data, out=args.out, steps=args.steps, threads=args.threads,
                      seed=args.seed)
    command = "python scripts/train_tiny.py " + shlex.join(sys.argv[1:] if argv is None
                                                            else argv)

    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()

    train_text = read_split(cfg.data, "train")
    tokenizer = build_tokenizer(cfg.vocab_size, texts=(
        line for lang in LANGUAGES for line in train_text[lang].splitlines()))
    streams = {lang: tokenize(tokenizer, text) for lang, text in train_text.items()}
    log.info("tokenizer: vocab %d; train tokens %s", len(tokenizer),
             {k: len(v) for k, v in streams.items()})

    config = baichuan2_config(
        alibi=False, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.seqlen * 2)
    model = BaichuanForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s parameters", f"{n_params:,}")
    result = train(model, streams, cfg, args.state)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "tiny-baichuan2"
        save_baichuan2(model, folder, torch.bfloat16)  # raw NormHead rows, as Baichuan2 ships
        tokenizer.save_pretrained(folder)

        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                     dtype=torch.bfloat16).eval()
        heldout = {lang: tokenize(tokenizer, text)
                   for lang, text in read_split(cfg.data, "heldout").items()}
        ppl = {lang: perplexity(saved, ids, cfg.seqlen) for lang, ids in heldout.items()}
        log.info("held-out perplexity: %s", {k: round(v, 2) for k, v in ppl.items()})
        size = folder_size(folder)
        (folder / "TRAINING.md").write_text(training_md(
            cfg, command, n_params, size, result,
            {k: len(v) for k, v in streams.items()}, ppl,
            {k: len(v) for k, v in heldout.items()}), encoding="utf-8")
        with atomic_output(cfg.out, force=True) as tmp:
            for path in sorted(folder.iterdir()):
                shutil.copy2(path, tmp / path.name)
    args.state.unlink(missing_ok=True)
    log.info("wrote %s (%.2f MB) in %.1f min", cfg.out, size / 1e6,
             (time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()
