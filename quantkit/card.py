"""The model card (README.md) and ModelScope's configuration.json for a pushed artifact.

A quantized upload is only useful if its page says what it is: the hub metadata header
(license, base_model, tags, library_name) that drives search and the "quantized from" link,
how to load it with each runtime, the exact quantization settings, and the measured cost
(the `quantkit report` table). Everything here is text built from the artifact's files;
nothing touches the network or the artifact itself.

The generated part sits between two HTML comments so that pushing again replaces it and
keeps whatever the source model's card said below it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import yaml

log = logging.getLogger(__name__)

CARD_START = "<!-- quantkit:card:start -->"
CARD_END = "<!-- quantkit:card:end -->"
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)
# Hub license ids are lowercase slugs ("apache-2.0", "llama2", "other").
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")


@dataclass(frozen=True)
class CardInputs:
    """What the card is built from; every field comes from the artifact or a flag."""

    repo: str
    hub: str  # "hf" or "modelscope"
    config: dict
    manifest: dict
    files: dict[str, int]  # relative path -> bytes, as uploaded
    source_card: str | None = None
    report_tables: list[str] = field(default_factory=list)
    license: str | None = None  # --license; None = from the source card, else "other"
    base_model: str | None = None


def split_front_matter(text: str) -> tuple[dict, str]:
    """(metadata, body) of a card; a broken header is dropped with a warning, not fatal."""
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        meta = None
    if not isinstance(meta, dict):
        log.warning("the source README.md has an unreadable metadata header; writing a new one")
        meta = {}
    return meta, text[m.end():]


def quantization_summary(config: dict) -> tuple[str, list[str], list[tuple[str, str]]]:
    """(one-line description, hub tags, settings rows) from config.json's quantization_config."""
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "gptq":
        bits = qc.get("bits")
        keys = ("bits", "group_size", "sym", "desc_act", "true_sequential", "damp_percent",
                "static_groups", "checkpoint_format")
        rows = [(k, _fmt(qc[k])) for k in keys if k in qc]
        group = qc.get("group_size")
        text = f"GPTQ {bits}-bit" + (f" (group size {group})" if group not in (None, -1) else "")
        return text, ["gptq", f"{bits}-bit"], rows
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            kind = str(qc.get("bnb_4bit_quant_type", "fp4"))
            keys = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                    "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage",
                    "llm_int8_skip_modules")
            rows = [(k, _fmt(qc[k])) for k in keys if k in qc]
            double = " with double quantization" if qc.get("bnb_4bit_use_double_quant") else ""
            return (f"bitsandbytes 4-bit {kind.upper()}{double}",
                    ["bitsandbytes", "4-bit", kind], rows)
        keys = ("load_in_8bit", "llm_int8_threshold", "llm_int8_skip_modules",
                "llm_int8_has_fp16_weight")
        rows = [(k, _fmt(qc[k])) for k in keys if k in qc]
        return "bitsandbytes 8-bit (LLM.int8)", ["bitsandbytes", "8-bit", "int8"], rows
    if method:
        return f"{method} quantization", [str(method)], [(k, _fmt(v)) for k, v in qc.items()]
    dtype = config.get("dtype") or config.get("torch_dtype") or "bf16"
    return f"unquantized ({dtype})", [], []


def build_card(inputs: CardInputs) -> str:
    """README.md text: merged metadata header, the quantkit section, then the source card."""
    source_meta, source_body = split_front_matter(inputs.source_card or "")
    summary, quant_tags, _ = quantization_summary(inputs.config)
    meta = dict(source_meta)
    meta.update(_license_fields(inputs.license, source_meta))
    if inputs.base_model:
        meta["base_model"] = inputs.base_model
        meta["base_model_relation"] = "quantized" if quant_tags else "finetune"
    else:
        # The source card's base_model names the source's own parent, not our source.
        meta.pop("base_model", None)
        meta.pop("base_model_relation", None)
    tags = [str(t) for t in (source_meta.get("tags") or []) if isinstance(t, (str, int))]
    meta["tags"] = list(dict.fromkeys([*tags, *quant_tags, "quantkit"]))
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    if inputs.hub == "modelscope":
        meta["frameworks"] = ["pytorch"]
        meta["tasks"] = ["text-generation"]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    section = f"{CARD_START}\n{_section(inputs, summary)}\n{CARD_END}"
    if CARD_START in source_body and CARD_END in source_body:
        before, rest = source_body.split(CARD_START, 1)
        after = rest.split(CARD_END, 1)[1]
        body = f"{before}{section}{after}"
    elif source_body.strip():
        body = f"{section}\n\n## Original model card\n\n{source_body.strip()}\n"
    else:
        body = f"{section}\n"
    return f"---\n{header}\n---\n\n{body.lstrip()}"


def modelscope_configuration(config: dict) -> dict:
    """configuration.json: ModelScope reads framework and task from it to list the model."""
    return {"framework": "pytorch", "task": "text-generation",
            "allow_remote": bool(config.get("auto_map"))}


def report_tables(markdown: str) -> list[str]:
    """The pipe tables of a `quantkit report` markdown file, each with the heading above it."""
    tables, heading, block = [], None, []
    for line in [*markdown.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            block.append(line.rstrip())
            continue
        if len(block) >= 2:
            tables.append("\n".join(([f"**{heading}**", ""] if heading else []) + block))
            heading = None
        block = []
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
    return tables


# ---------------------------------------------------------------------------- sections


def _section(inputs: CardInputs, summary: str) -> str:
    name = inputs.repo.split("/", 1)[1]
    source = (f"[{inputs.base_model}]({_model_url(inputs.hub, inputs.base_model)})"
              if inputs.base_model else "its source model")
    tool = f"quantkit {inputs.manifest.get('version', '')}".strip()
    quantized = bool(inputs.config.get("quantization_config"))
    intro = (f"{source[0].upper()}{source[1:]}, quantized to {summary} with {tool}."
             if quantized else f"{source[0].upper()}{source[1:]}, rewritten by {tool} ({summary}).")
    parts = [
        f"# {name}",
        intro,
        "## Quantization",
        _settings_table(inputs),
        "## How to load",
        _load_instructions(inputs),
    ]
    if inputs.report_tables:
        parts += ["## Evaluation",
                  "Measured with `quantkit eval` / `quantkit mem`, tabulated by `quantkit report`.",
                  *inputs.report_tables]
    parts += ["## Files", _files_table(inputs)]
    return "\n\n".join(parts)


def _settings_table(inputs: CardInputs) -> str:
    _, _, rows = quantization_summary(inputs.config)
    qc = inputs.config.get("quantization_config") or {}
    rows = [("method", str(qc.get("quant_method", "none"))), *rows]
    manifest = inputs.manifest
    for key, value in manifest.items():
        if key in ("tool", "version", "command", "started", "finished", "source", "files"):
            continue
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", _fmt(v)) for k, v in value.items() if _is_scalar(v)]
        elif _is_scalar(value):
            rows.append((key, _fmt(value)))
    if manifest.get("command"):
        rows.append(("command", f"`{manifest['command']}`"))
    if manifest.get("finished"):
        rows.append(("made", str(manifest["finished"])))
    total = sum(inputs.files.values())
    rows.append(("size on disk", f"{format_size(total)} in {len(inputs.files)} files"))
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '&#124;')} |" for k, v in rows]
    return "\n".join(lines)


def _load_instructions(inputs: CardInputs) -> str:
    repo, config = inputs.repo, inputs.config
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    remote = ", trust_remote_code=True" if config.get("auto_map") else ""
    needs = {"gptq": "`pip install optimum gptqmodel`",
             "bitsandbytes": "`pip install bitsandbytes` and a CUDA GPU"}.get(method)
    out = ["### transformers"]
    if needs:
        out.append(f"Needs {needs}; the quantization settings are read from `config.json`.")
    if inputs.hub == "modelscope":
        out.append("```python\nfrom modelscope import snapshot_download\n"
                   "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                   f'path = snapshot_download("{repo}")\n'
                   f"tokenizer = AutoTokenizer.from_pretrained(path{remote})\n"
                   "model = AutoModelForCausalLM.from_pretrained(path, device_map=\"auto\""
                   f"{remote})\n```")
    else:
        out.append("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                   f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{remote})\n'
                   f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto"'
                   f"{remote})\n```")
    vllm_env = "VLLM_USE_MODELSCOPE=True " if inputs.hub == "modelscope" else ""
    remote_flag = " --trust-remote-code" if remote else ""
    out.append("### vLLM")
    if method == "gptq":
        marlin = qc.get("sym", True) and qc.get("bits") in (4, 8)
        out.append("Symmetric 4/8-bit GPTQ runs on vLLM's Marlin kernel:" if marlin else
                   "Not Marlin-compatible (Marlin wants sym=True and 4 or 8 bits):")
        flag = "gptq_marlin" if marlin else "gptq"
        out.append(f"```bash\n{vllm_env}vllm serve {repo} --quantization {flag}{remote_flag}\n```")
    elif method == "bitsandbytes":
        out.append(f"```bash\n{vllm_env}vllm serve {repo} --quantization bitsandbytes"
                   f"{remote_flag}\n```")
    else:
        out.append(f"```bash\n{vllm_env}vllm serve {repo}{remote_flag}\n```")
    download = (f"modelscope download --model {repo} --local_dir {repo.split('/')[1]}"
                if inputs.hub == "modelscope"
                else f"hf download {repo} --local-dir {repo.split('/')[1]}")
    remote_kw = ", trust_remote_code=True" if remote else ""
    out.append("### quantkit")
    out.append(f"```bash\n{download}\n"
               f"python -c \"import quantkit; print(quantkit.load('{repo.split('/')[1]}'"
               f"{remote_kw}))\"\n```")
    return "\n\n".join(out)


def _files_table(inputs: CardInputs) -> str:
    lines = ["Every file's sha256 was checked against `quantkit.json` before upload.", "",
             "| file | size |", "|---|---|"]
    lines += [f"| {name} | {format_size(size)} |" for name, size in sorted(inputs.files.items())]
    return "\n".join(lines)


def _license_fields(flag: str | None, source_meta: dict) -> dict:
    """license (+ license_name for a free-text one): the flag, else the source card, else other."""
    source = source_meta.get("license")
    if flag and source and str(source) != flag:
        log.warning("--license %s replaces the source card's license %r", flag, source)
    value = str(flag or source or "other")
    if _LICENSE_ID.fullmatch(value):
        out = {"license": value}
        for key in ("license_name", "license_link"):
            if value == "other" and source_meta.get(key) and not flag:
                out[key] = source_meta[key]
        return out
    slug = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-") or "custom"
    return {"license": "other", "license_name": slug}


def _model_url(hub: str, repo: str) -> str:
    return (f"https://modelscope.cn/models/{repo}" if hub == "modelscope"
            else f"https://huggingface.co/{repo}")


def _is_scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool)) and len(str(value)) <= 200


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
