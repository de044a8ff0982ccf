"""Quantize models that do not fit in host memory: a meta-device skeleton, filled per layer.

`quantkit gptq` used to load the whole BF16 model before any work (140 GB of host RAM for
a 70B model). Here the module tree is built on the meta device (names, shapes, dtypes, no
storage), and tensors are read from the memory-mapped checkpoint shards through
`quantkit.checkpoint` only while they are needed:

- the modules before the first decoder layer (embeddings, rotary tables) while the first
  layer's inputs are captured, each one when its forward is first called;
- one decoder layer while it is calibrated and solved; its packed tensors then go to the
  output writer and the layer goes back to meta;
- the final norm and the head never: GPTQ does not run them, they are copied tensor by
  tensor from the source shards to the output.

Host peak is about one decoder layer plus the calibration activations, the Hessians and
one tensor of the output writer, not the model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from quantkit.checkpoint import Checkpoint, CheckpointStream
from quantkit.errors import QuantizationError
from quantkit.gptq.calibrate import QuantizedLayers
from quantkit.gptq.host_memory import give_back_freed_memory
from quantkit.validate import all_finite

log = logging.getLogger(__name__)


def stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype transformers' `dtype="auto"` picks: config.json's, else the first float
    tensor's."""
    name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    for tensor in ckpt.tensor_names():
        dtype, _ = ckpt.tensor_meta(tensor)
        if dtype.is_floating_point:
            return dtype
    return torch.float32


def build_skeleton(ckpt: Checkpoint, trust_remote_code: bool) -> nn.Module:
    """The model with every parameter on the meta device; buffers built for real.

    Buffers stay real because most are computed in `__init__` (rotary inverse frequencies,
    ALiBi slopes) and are not in the checkpoint, so they could not be filled in later.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=stored_dtype(ckpt),
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def _is_meta(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.device.type == "meta"


class LazyLayers:
    """The `layers` source of `calibrate.quantize_layers` for a meta skeleton.

    `fetch` fills a decoder layer from the checkpoint on `device`; `release` hands its
    packed tensors and its other source tensors to `sink` and returns it to meta;
    `outside` fills the modules before the first layer for the capture forward.
    """

    def __init__(self, model: nn.Module, ckpt: Checkpoint, rename: Callable[[str], str], *,
                 device: str, layers_path: str,
                 sink: Callable[[int, QuantizedLayers], None] | None = None,
                 on_layer: Callable[[int, float], None] | None = None):
        self.model = model
        self.ckpt = ckpt
        self.device = device
        self.layers_path = layers_path
        self.sink = sink
        self.on_layer = on_layer
        self.tensor_of = {rename(name): name for name in ckpt.tensor_names()}
        self._started: dict[int, float] = {}
        give_back_freed_memory(first=True)
        self.seconds: dict[int, float] = {}  # decoder layer -> wall seconds, fetch to release

    # ---------------------------------------------------------------- filling
    def _load(self, full_name: str, like: torch.Tensor) -> torch.Tensor:
        stored = self.tensor_of.get(full_name)
        if stored is None:
            raise QuantizationError(f"{self.ckpt.path}: the model's tensor {full_name} is not "
                                    "in the checkpoint; quantkit cannot load it layer by layer")
        tensor = self.ckpt.get_tensor(stored)
        if tuple(tensor.shape) != tuple(like.shape):
            raise QuantizationError(f"{self.ckpt.path}: tensor {stored} has shape "
                                    f"{tuple(tensor.shape)}, the model expects "
                                    f"{tuple(like.shape)}")
        if tensor.is_floating_point():
            tensor = tensor.to(like.dtype)
        # A copy owned by this process: the memory map is dropped right after, and the
        # solver writes the quantized values into the weights in place.
        tensor = tensor.to(self.device, copy=True)
        if tensor.is_floating_point() and not all_finite(tensor):
            raise QuantizationError(
                f"{self.ckpt.path}: tensor {stored} contains NaN or Inf values; the "
                "checkpoint is damaged, download or convert it again")
        return tensor

    def materialize(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """Replace `module`'s meta parameters (and persistent meta buffers) by real ones."""
        modules = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
        for name, m in modules:
            for key, p in m._parameters.items():
                if _is_meta(p):
                    full = f"{name}.{key}" if name else key
                    m._parameters[key] = nn.Parameter(self._load(full, p), requires_grad=False)
            for key, b in m._buffers.items():
                if _is_meta(b):
                    full = f"{name}.{key}" if name else key
                    m._buffers[key] = self._load(full, b)
        self.ckpt.release()

    @staticmethod
    def to_meta(module: nn.Module) -> None:
        """Free `module`'s parameters: back to meta tensors of the same shape and dtype."""
        for m in module.modules():
            for key, p in m._parameters.items():
                if p is not None and not _is_meta(p):
                    m._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                      requires_grad=False)

    # ---------------------------------------------------------------- the layers protocol
    def fetch(self, index: int, layer: nn.Module) -> None:
        self._started[index] = time.perf_counter()
        self.materialize(layer, f"{self.layers_path}.{index}")

    def release(self, index: int, layer: nn.Module, result: QuantizedLayers) -> None:
        if self.sink is not None:
            self.sink(index, result)
        prefix = f"{self.layers_path}.{index}."
        for name in [n for n in result.packed if n.startswith(prefix)]:
            del result.packed[name]  # written (rank 0) or not ours to write: drop it
        self.to_meta(layer)
        give_back_freed_memory()
        seconds = time.perf_counter() - self._started.pop(index)
        self.seconds[index] = seconds
        log.debug("layer %d: %.2f s", index, seconds)
        if self.on_layer is not None:
            self.on_layer(index, seconds)

    @contextlib.contextmanager
    def outside(self, model: nn.Module, skip: Sequence[nn.Module]) -> Iterator[None]:
        """Fill each module outside `skip` when its forward first runs; free them after.

        Only what the capture forward really calls is read (the embeddings, not the final
        norm or the head).
        """
        skipped = {id(m) for s in skip for m in s.modules()}
        filled: list[nn.Module] = []
        names = {id(m): n for n, m in model.named_modules()}

        def fill(module, args):
            self.materialize(module, names[id(module)], recurse=False)
            filled.append(module)

        handles = [m.register_forward_pre_hook(fill) for m in model.modules()
                   if id(m) not in skipped and any(
                       _is_meta(t) for t in [*m._parameters.values(), *m._buffers.values()])]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in filled:
                self.to_meta(module)


class ArtifactSink:
    """Streams a GPTQ artifact's tensors to the output as layers finish (rank 0 only).

    A finished layer's source tensors are written with each quantized Linear's weight
    replaced by its packed tensors (`artifact.artifact_tensors`, the same mapping the
    whole-model path uses); `finish` copies every tensor outside the decoder layers.
    """

    def __init__(self, out: CheckpointStream, ckpt: Checkpoint, rename: Callable[[str], str],
                 layers_path: str):
        self.out = out
        self.ckpt = ckpt
        self.rename = rename
        self.layers_path = layers_path
        self.by_layer: dict[int, list[str]] = {}
        self.others: list[str] = []
        prefix = layers_path + "."
        for name in ckpt.tensor_names():
            renamed = rename(name)
            index = renamed[len(prefix):].split(".", 1)[0] if renamed.startswith(prefix) else ""
            if index.isdigit():
                self.by_layer.setdefault(int(index), []).append(name)
            else:
                self.others.append(name)

    def _source(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.ckpt.get_tensor(name)
        self.ckpt.release()

    def write_layer(self, index: int, result: QuantizedLayers) -> None:
        from quantkit.gptq.artifact import artifact_tensors

        prefix = f"{self.layers_path}.{index}."
        layer = QuantizedLayers(result.layers_path, {
            name: packed for name, packed in result.packed.items() if name.startswith(prefix)})
        self.out.add_all(artifact_tensors(self._source(self.by_layer.get(index, [])), layer,
                                          self.rename))

    def finish(self) -> None:
        self.out.add_all(self._source(self.others))
