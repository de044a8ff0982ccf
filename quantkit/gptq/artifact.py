"""The GPTQ output folder: which tensors, which JSON, and what quantkit.json records.

Every GPTQ loader (transformers + optimum + gptqmodel, gptqmodel, auto-gptq, vLLM,
exllamav2) reads the same thing: per quantized Linear `qweight`, `qzeros`, `scales`,
`g_idx` (and a float16 `bias`), every other tensor as it was, and the settings both in
config.json's `quantization_config` and in `quantize_config.json` (older loaders read only
the latter).

We always write v1 (`checkpoint_format: "gptq"`, zero points stored minus one), the one
format all of them accept. For `--asym` that is safe because the solver keeps every zero
point at 1 or above (see `algorithm.choose_qparams`): gptqmodel converts v1 to v2 by
adding 1 to each packed field with a plain integer add, which carries into the next field
when a stored zero is -1, and vLLM and exllamav2 add the 1 in their kernels. vLLM's Marlin
kernels need sym=True (4 or 8 bits); asymmetric artifacts run there on its plain GPTQ kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from quantkit.checkpoint import Checkpoint, write_checkpoint
from quantkit.errors import CheckpointError
from quantkit.gptq.algorithm import QuantSpec
from quantkit.gptq.calibrate import QuantizedLayers
from quantkit.gptq.skip import dynamic_exclusions

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gptq"
QUANTIZE_CONFIG = "quantize_config.json"
MANIFEST_KEY = "gptq"


def quantization_config(spec: QuantSpec, *, true_sequential: bool, method: str = "gptq",
                        skip_modules: Sequence[str] = (),
                        modules_in_block: Sequence[str] = ()) -> dict:
    """The `quantization_config` block, in the keys transformers and gptqmodel read.

    A round-to-nearest baseline is stored in the same format (so every loader reads it) and
    says so in `meta.method`, which loaders ignore and reports use for the row label.
    With --skip-modules, the Linears each decoder layer quantizes are listed in
    `modules_in_block_to_quantize` (what transformers/optimum read) and the skipped ones as
    `dynamic` exclusions (what gptqmodel and vLLM read).
    """
    from quantkit import __version__

    meta = {"quantizer": [f"quantkit:{__version__}"]}
    if method != "gptq":
        meta["method"] = method
    qconfig = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": spec.desc_act,
        "sym": spec.sym,
        "true_sequential": true_sequential,
        "damp_percent": spec.damp,
        "static_groups": spec.static_groups,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": meta,
    }
    if skip_modules:
        qconfig["modules_in_block_to_quantize"] = [list(modules_in_block)]
        qconfig["dynamic"] = dynamic_exclusions(skip_modules)
    return qconfig


def artifact_tensors(source: Iterable[tuple[str, torch.Tensor]], layers: QuantizedLayers,
                     rename: Callable[[str], str] = lambda key: key,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's tensors, with each quantized Linear's weight replaced by its packed
    tensors; biases of quantized Linears become float16 as GPTQ loaders allocate them.

    Names stay the checkpoint's; `rename` maps them to the model's module names.
    """
    written = set()
    for name, tensor in source:
        module, _, leaf = rename(name).rpartition(".")
        packed = layers.packed.get(module)
        if packed is None:
            yield name, tensor
        elif leaf == "weight":
            written.add(module)
            yield from packed.named_tensors(name.rpartition(".")[0])
        elif leaf == "bias":
            yield name, tensor.to(torch.float16)
        else:
            yield name, tensor
    missing = sorted(set(layers.packed) - written)
    if missing:
        raise CheckpointError(f"no source tensor {missing[0]}.weight to replace with its "
                              "quantized form; the checkpoint's tensor names do not match "
                              "the model's modules")


def write_artifact(dest: Path, source: Checkpoint, source_tensors: Iterable, *,
                   layers: QuantizedLayers, spec: QuantSpec, true_sequential: bool,
                   manifest: dict, force: bool, max_shard_size: str,
                   rename: Callable[[str], str] = lambda key: key, method: str = "gptq",
                   skip_modules: Sequence[str] = (), modules_in_block: Sequence[str] = ()
                   ) -> Path:
    """Write the folder atomically through `checkpoint.write_checkpoint`."""
    qconfig = quantization_config(spec, true_sequential=true_sequential, method=method,
                                  skip_modules=skip_modules, modules_in_block=modules_in_block)
    config = dict(source.config, quantization_config=qconfig)
    return write_checkpoint(
        dest, artifact_tensors(source_tensors, layers, rename), source=source, config=config,
        extra_files={QUANTIZE_CONFIG: qconfig}, manifest_extra={MANIFEST_KEY: manifest},
        force=force, max_shard_size=max_shard_size,
    )
