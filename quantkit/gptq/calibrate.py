"""Layer streaming: run calibration text through the model one decoder layer at a time.

Only the decoder layer being quantized and the calibration activations live on the
device; everything else stays in host memory. Every layer's inputs are captured once from
a real forward of the whole model in which each decoder layer only records what the model
passes it -- masks, position ids, rotary embeddings, ALiBi biases -- and hands its input
on, so the engine never re-implements any architecture's preamble. Models that mix
attention types (`config.layer_types`: Gemma-2/3 sliding and full attention) give each
layer its own mask and rotary table, so layer i is replayed with layer i's arguments, on
the quantized outputs of layer i - 1.

Forwards compute in `StreamOptions.compute_dtype` (fp32 on CPUs without native bf16; the
stored bf16 on CUDA) while Hessians always accumulate in fp32; a layer is converted on its
way to the device and restored to its stored dtype when it is done.

Inside a layer, Linears that read the same tensor (q, k, v; gate, up) form a group that
shares one Hessian and one solve. With true-sequential (the default) the groups are
quantized in forward order, each after a forward through the already-quantized groups
before it; that forward stops as soon as the group's input has been seen.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.compute import compute_dtype, computing_in, stored_dtype
from quantkit.errors import QuantizationError
from quantkit.families import Family, supported_families
from quantkit.gptq.algorithm import (
    NotPositiveDefinite,
    QuantSpec,
    gptq_fast,
    gptq_reference,
    one_thread_on_cpu,
    output_errors,
    rtn_quantize,
)
from quantkit.gptq.distributed import SingleProcess
from quantkit.gptq.host_memory import give_back_freed_memory
from quantkit.gptq.offload import HostBatches
from quantkit.gptq.pack import PackedLinear, pack_result
from quantkit.gptq.skip import is_skipped
from quantkit.gptq.timing import PhaseTimer

log = logging.getLogger(__name__)

SOLVERS = ("fast", "reference", "rtn")  # rtn: round-to-nearest baseline, same grid and format
_AUTO_BATCH_TOKENS = 16384  # tokens per calibration forward when --batch-size is not given


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once it has given what we need."""


@dataclass
class LinearReport:
    """How one Linear came out: relative output error on the calibration inputs."""

    name: str
    error: float  # ||(W - Q) X||^2 / ||W X||^2 for GPTQ
    rtn_error: float  # the same for round-to-nearest on the same grid
    damp: float


@dataclass
class QuantizedLayers:
    """Everything the artifact writer needs from a run, tensors already on the host."""

    layers_path: str
    packed: dict[str, PackedLinear] = field(default_factory=dict)  # module path -> tensors
    reports: list[LinearReport] = field(default_factory=list)

    def layer_errors(self) -> list[tuple[int, float, float]]:
        """(decoder layer index, mean GPTQ error, mean RTN error) per decoder layer."""
        by_layer: dict[int, list[LinearReport]] = {}
        prefix = self.layers_path + "."
        for report in self.reports:
            index = int(report.name[len(prefix):].split(".", 1)[0])
            by_layer.setdefault(index, []).append(report)
        return [(i, sum(r.error for r in rs) / len(rs), sum(r.rtn_error for r in rs) / len(rs))
                for i, rs in sorted(by_layer.items())]


@dataclass(frozen=True)
class StreamOptions:
    """How to run the layers: where, in what batches, with which solver."""

    device: str = "cpu"
    batch_size: int | None = None  # None: about 16k tokens per forward
    true_sequential: bool = True
    solver: str = "fast"
    activations_on_host: bool = False  # keep calibration activations in host memory
    compute_dtype: torch.dtype | None = None  # None: see `quantkit.compute.compute_dtype`
    skip_modules: tuple[str, ...] = ()  # Linears left unquantized (`quantkit.gptq.skip`)


# --------------------------------------------------------------------------- discovery


def get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_decoder_layers(model: nn.Module, family: Family | None,
                        label: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: from the family table, else the largest list of
    identical blocks that hold Linear modules."""
    if family is not None:
        layers = get_submodule(model, family.layers_path)
        if isinstance(layers, nn.ModuleList) and len(layers) and _has_linear(layers[0]):
            return family.layers_path, layers
    candidates = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module)
                and len({type(m) for m in module}) == 1 and _has_linear(module[0])):
            size = sum(p.numel() for p in module.parameters())
            candidates.append((size, name, module))
    if not candidates:
        raise QuantizationError(
            f"{label}: found no decoder layers with Linear modules to quantize; quantkit "
            f"supports these families: {supported_families()}"
        )
    _, name, layers = max(candidates, key=lambda c: c[0])
    if family is None:
        log.warning("%s: not in quantkit's family table; quantizing the %d blocks at %s",
                    label, len(layers), name)
    return name, layers


def linear_names(layer: nn.Module) -> list[str]:
    return [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def trace_linear_groups(layer: nn.Module, run: Callable[[], None]) -> list[list[str]]:
    """Linears grouped by the tensor they read, in the order the forward reaches them."""
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []

    def hook(name):
        def record(module, args):
            x = args[0]
            for tensor, names in seen:
                if tensor is x:
                    names.append(name)
                    return
            seen.append((x, [name]))
        return record

    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [names for _, names in seen]


def linear_groups(layer: nn.Module, family: Family | None,
                  run: Callable[[], None]) -> list[list[str]]:
    """The family table's groups when they name exactly this layer's Linears, else traced."""
    names = set(linear_names(layer))
    if family is not None and set(family.linear_names) == names:
        return [list(g) for g in family.sequential_groups]
    groups = trace_linear_groups(layer, run)
    missing = names - {n for g in groups for n in g}
    if missing:
        raise QuantizationError(f"Linear modules {', '.join(sorted(missing))} never ran "
                                "during calibration, so GPTQ has no inputs for them")
    if family is not None:
        log.info("Linear groups traced from a forward pass (the %s table does not match): %s",
                 family.name, groups)
    return groups


# --------------------------------------------------------------------------- capture


@dataclass
class LayerInputs:
    """What the model passes its decoder layers, one entry per batch.

    `hidden` is the current layer's input (layer 0's at capture, then each layer's
    outputs); `args[l][b]` and `kwargs[l][b]` are what layer `l` receives besides it.
    Tensors that are the same object for several layers or batches are stored once.
    """

    hidden: list[torch.Tensor]
    args: list[list[tuple]]
    kwargs: list[list[dict]]

    def for_layer(self, index: int) -> tuple[list[tuple], list[dict]]:
        return self.args[index], self.kwargs[index]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _share_equal(obj, first):
    """Reuse batch 0's tensor where this batch's is identical (masks, rotary tables)."""
    if obj is first:
        return first
    if isinstance(obj, torch.Tensor) and isinstance(first, torch.Tensor):
        same = (obj.shape == first.shape and obj.dtype == first.dtype
                and obj.device == first.device and torch.equal(obj, first))
        return first if same else obj
    if isinstance(obj, (list, tuple)) and isinstance(first, (list, tuple)) and len(obj) == len(
            first):
        return type(obj)(_share_equal(o, f) for o, f in zip(obj, first, strict=True))
    if isinstance(obj, dict) and isinstance(first, dict):
        return {k: _share_equal(v, first.get(k)) for k, v in obj.items()}
    return obj


def _move_params(module: nn.Module, device, skip: Sequence[nn.Module]) -> None:
    """Move parameters and buffers to `device`, except inside the `skip` subtrees."""
    skipped = {id(m) for s in skip for m in s.modules()}
    for m in module.modules():
        if id(m) in skipped:
            continue
        for key, p in m._parameters.items():
            if p is not None and p.device != torch.device(device):
                m._parameters[key] = nn.Parameter(p.data.to(device), requires_grad=False)
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = b.to(device)


class HostLayers:
    """Where layers come from when the whole model is in host memory: each decoder layer
    visits the device while it is processed (`lazy_model.LazyLayers` reads them from disk
    instead)."""

    def __init__(self, device: str):
        self.device = device

    def fetch(self, index: int, layer: nn.Module) -> None:
        layer.to(self.device)

    def release(self, index: int, layer: nn.Module, result: QuantizedLayers) -> None:
        layer.to("cpu")

    @contextlib.contextmanager
    def outside(self, model: nn.Module, skip: Sequence[nn.Module]) -> Iterator[None]:
        """The modules outside `skip` on the device for the capture forward."""
        if self.device == "cpu":
            yield
            return
        _move_params(model, self.device, skip)
        try:
            yield
        finally:
            _move_params(model, "cpu", skip)


def _forward_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if "use_cache" in params or takes_any else {}


def auto_batch_size(seqlen: int) -> int:
    """Sequences per calibration forward when the user does not say: about 16k tokens."""
    return max(1, _AUTO_BATCH_TOKENS // seqlen)


def batches(total: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]


class _Recorder:
    """Stands in for one decoder layer's forward: records its inputs, returns its input."""

    def __init__(self, index: int, last: bool, captured: LayerInputs, act_device: str,
                 dtype: torch.dtype):
        self.index, self.last, self.captured = index, last, captured
        self.act_device, self.dtype = act_device, dtype

    def __call__(self, *args, **kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.captured.hidden.append(hidden.to(self.act_device, self.dtype))
        self.captured.args[self.index].append(tuple(args[1:]))
        self.captured.kwargs[self.index].append(kwargs)
        if self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                   batch_size: int, device: str, act_device: str,
                   dtype: torch.dtype | None = None,
                   source: HostLayers | None = None) -> LayerInputs:
    """Run the model's preamble and keep what each decoder layer receives.

    The layers themselves do not run (their weights are never touched): each one's
    forward is replaced by a recorder that passes its input on, so the model computes
    every per-layer argument itself. Should a model do something between layers that a
    pass-through breaks, every layer falls back to layer 0's arguments, with a warning.
    """
    dtype = dtype or stored_dtype(model)
    source = source or HostLayers(device)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = [layers] + ([head] if isinstance(head, nn.Module) else [])
    with source.outside(model, skip):
        try:
            captured = _record(model, layers, input_ids, batch_size, device, act_device,
                               dtype, every_layer=True)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            log.warning("recording every decoder layer's arguments failed (%s); replaying "
                        "layer 0's arguments in every layer", exc)
            captured = _record(model, layers, input_ids, batch_size, device, act_device,
                               dtype, every_layer=False)
    for index in range(len(captured.args)):
        for i in range(len(captured.args[index])):
            for other in ((index, 0), (index - 1, i)):  # batch 0, then the layer before
                if other[0] >= 0 and other != (index, i):
                    captured.args[index][i] = _share_equal(
                        captured.args[index][i], captured.args[other[0]][other[1]])
                    captured.kwargs[index][i] = _share_equal(
                        captured.kwargs[index][i], captured.kwargs[other[0]][other[1]])
    return captured


def _record(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
            batch_size: int, device: str, act_device: str, dtype: torch.dtype, *,
            every_layer: bool) -> LayerInputs:
    count = len(layers) if every_layer else 1
    captured = LayerInputs([], [[] for _ in range(count)], [[] for _ in range(count)])
    own = [layers[index].__dict__.get("forward") for index in range(count)]  # e.g. hooks
    for index in range(count):
        layers[index].forward = _Recorder(index, index == count - 1, captured, act_device,
                                          dtype)
    extra = _forward_kwargs(model)
    try:
        with computing_in(model, dtype):
            for part in batches(len(input_ids), batch_size):
                try:
                    model(input_ids=input_ids[part].to(device), **extra)
                except _StopForward:
                    pass
                else:
                    raise QuantizationError("the model ran to the end without calling its "
                                            "decoder layers; quantkit cannot capture their "
                                            "inputs")
    finally:
        for index in range(count):
            if own[index] is None:
                del layers[index].forward  # the class's forward again
            else:
                layers[index].forward = own[index]
    if not every_layer:
        captured.args = [captured.args[0]] * len(layers)
        captured.kwargs = [captured.kwargs[0]] * len(layers)
    return captured


# --------------------------------------------------------------------------- per layer


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


# Each batch's X^T X is a float32 product; the running sum is float64. Adding a few dozen
# float32 terms in float64 is exact in practice, so the Hessian does not depend on the
# order batches are summed in: one process and N ranks (each summing its own batches,
# then summed across ranks) get the same bits, and so the same GPTQ codes. A float32 sum
# would differ in its last bits, flip a few codes, and through the quantized layer change
# every later layer's inputs. The solver gets the float32 value.
HESSIAN_SUM_DTYPE = torch.float64


class _HessianHooks:
    """Accumulate X^T X for the first Linear of each group during forwards."""

    def __init__(self, modules: dict[str, nn.Module], groups: list[list[str]], device: str,
                 timer: PhaseTimer):
        self.timer = timer
        self.hessians: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.fired: set[str] = set()
        self.handles = []
        for group in groups:
            key = group[0]
            module = modules[key]
            self.hessians[key] = torch.zeros((module.in_features, module.in_features),
                                             dtype=HESSIAN_SUM_DTYPE, device=device)
            self.rows[key] = 0
            self.handles.append(module.register_forward_pre_hook(self._hook(key)))

    def _hook(self, key):
        def accumulate(module, args):
            with self.timer.phase("hessians"):
                x = args[0].reshape(-1, args[0].shape[-1])
                add_gram(self.hessians[key], x)
                self.rows[key] += x.shape[0]
            self.fired.add(key)
            if len(self.fired) == len(self.hessians):  # nothing later in the layer is needed
                raise _StopForward
        return accumulate

    def remove(self):
        for handle in self.handles:
            handle.remove()


_MM_OUT_DTYPE: dict[str, bool] = {}
_GRAM_BLOCK_ELEMENTS = 8 << 20  # 32 MB of float32 per partial product


def add_gram(hessian: torch.Tensor, x: torch.Tensor) -> None:
    """hessian += x^T x, the product in float32 (on CUDA straight from bf16/fp16 when
    supported)."""
    device_type = x.device.type
    if x.dtype != torch.float32 and _MM_OUT_DTYPE.get(device_type, device_type == "cuda"):
        try:
            hessian.add_(torch.mm(x.T, x, out_dtype=torch.float32))
            _MM_OUT_DTYPE[device_type] = True
            return
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE[device_type] = False
    xf = x.float()
    # A block of columns at a time: the float32 product of a 11008-wide input alone would
    # be 485 MB next to the float64 sum (host memory on CPU runs of big layers).
    step = max(1, _GRAM_BLOCK_ELEMENTS // xf.shape[1])
    for j in range(0, xf.shape[1], step):
        hessian[:, j:j + step].add_(torch.mm(xf.T, xf[:, j:j + step]))


class LayerRunner:
    """Forwards of decoder layer `index` over all calibration batches."""

    def __init__(self, layer: nn.Module, inputs: LayerInputs, device: str, index: int = 0):
        self.layer = layer
        self.inputs = inputs
        self.device = device
        self.args, self.kwargs = inputs.for_layer(index)
        on_host = device != "cpu" and inputs.hidden and inputs.hidden[0].device.type == "cpu"
        # --max-gpu-memory: batches stream from host memory, copies overlapped with compute
        self.feed = HostBatches(inputs.hidden, device) if on_host else None

    def forward(self, i: int):
        if self.feed is not None:
            hidden = self.feed.get(i)
        else:
            hidden = self.inputs.hidden[i].to(self.device, non_blocking=True)
        return _first(self.layer(hidden, *self.args[i], **self.kwargs[i]))

    def outputs(self, act_device: str) -> list[torch.Tensor]:
        if self.feed is None or act_device != "cpu":
            return [self.forward(i).to(act_device) for i in range(len(self.inputs.hidden))]
        outputs = [self.feed.to_host(self.forward(i)) for i in range(len(self.inputs.hidden))]
        self.feed.wait()
        return outputs


def layer_to(layer: nn.Module, device: str, dtype: torch.dtype) -> list[tuple]:
    """Move `layer` to `device`, converting tensors in the stored half precision to `dtype`
    (fp32 buffers such as rotary frequencies stay fp32); returns what `layer_back` needs."""
    restore = []
    for module in layer.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None:
                    continue
                target = dtype if t.is_floating_point() and t.dtype in _HALF else t.dtype
                restore.append((table, key, t.dtype))
                moved = t.data.to(device, target)
                table[key] = nn.Parameter(moved, requires_grad=False) \
                    if isinstance(t, nn.Parameter) else moved
    return restore


def layer_back(restore: list[tuple]) -> None:
    """Back to host memory in the stored dtypes (the dequantized weights included)."""
    for table, key, dtype in restore:
        t = table[key]
        moved = t.data.to("cpu", dtype)
        table[key] = nn.Parameter(moved, requires_grad=False) \
            if isinstance(t, nn.Parameter) else moved


_HALF = (torch.bfloat16, torch.float16)


def _solve_group(modules: dict[str, nn.Module], names: list[str], prefix: str,
                 hessian: torch.Tensor, rows: int, spec: QuantSpec, solver: str,
                 timer: PhaseTimer, out: QuantizedLayers) -> None:
    """Quantize the Linears that share `hessian`; write the dequantized weights back in place
    so later groups and layers see the quantized model."""
    label = f"{prefix}.{'/'.join(names)}"
    if rows == 0:
        raise QuantizationError(f"{label}: received no inputs during calibration")
    weights = [modules[n].weight.data for n in names]
    with timer.phase("solve"), one_thread_on_cpu(hessian.device):
        try:
            if solver == "fast":
                results = gptq_fast(weights, hessian, spec)
            elif solver == "rtn":
                results = [rtn_quantize(w, spec) for w in weights]
            else:
                results = [gptq_reference(w, hessian, spec) for w in weights]
        except NotPositiveDefinite as exc:
            reason = ("it holds Inf/NaN: this layer's inputs overflow" if exc.nonfinite else
                      f"even with damping {exc.damps[-1]:g} (tried "
                      f"{', '.join(f'{d:g}' for d in exc.damps)})")
            raise QuantizationError(
                f"{label}: the Hessian is not positive-definite, {reason}; try a larger "
                "--damp, more or different calibration text (--calib, --nsamples)"
            ) from None
        reports = []
        for name, weight, result in zip(names, weights, results, strict=True):
            quantized = result.dequantize()
            rtn = rtn_quantize(weight, spec).dequantize()
            error, rtn_error = output_errors(weight, [quantized, rtn], hessian)
            reports.append(LinearReport(f"{prefix}.{name}", error, rtn_error, result.damp))
            weight.copy_(quantized.to(weight.dtype))
    with timer.phase("pack"), one_thread_on_cpu(hessian.device):
        for name, result in zip(names, results, strict=True):
            out.packed[f"{prefix}.{name}"] = pack_result(result, spec.bits).to("cpu")
    out.reports.extend(reports)


def _reduce_phase(timer: PhaseTimer, parallel: SingleProcess):
    """Time spent in (and waiting at) collectives; no phase at all in one process."""
    return timer.phase("reduce") if parallel.world_size > 1 else contextlib.nullcontext()


@torch.no_grad()
def quantize_layers(model: nn.Module, input_ids: torch.Tensor, spec: QuantSpec, *,
                    family: Family | None, options: StreamOptions, timer: PhaseTimer,
                    label: str, source: HostLayers | None = None,
                    parallel: SingleProcess | None = None) -> QuantizedLayers:
    """Quantize every Linear of every decoder layer of `model` (in host memory) in place.

    On return the model's Linear weights hold their dequantized values (a fake-quantized
    model) and the result holds the packed tensors to write. `source` says where layers
    come from and go after (default: host memory; `lazy_model.LazyLayers` reads them from
    disk and streams them out, leaving nothing in the result), `parallel` how this process
    shares the work with other ranks (`distributed`; `input_ids` are then this rank's rows).
    """
    if options.solver not in SOLVERS:
        raise ValueError(f"solver {options.solver!r}: expected one of {SOLVERS}")
    device = options.device
    act_device = "cpu" if options.activations_on_host else device
    source = source or HostLayers(device)
    parallel = parallel or SingleProcess(device)
    layers_path, layers = find_decoder_layers(model, family, label)
    batch_size = options.batch_size or auto_batch_size(input_ids.shape[1])
    dtype = options.compute_dtype or compute_dtype(device, stored_dtype(model))
    with timer.phase("capture"):
        inputs = capture_inputs(model, layers, input_ids, batch_size, device, act_device,
                                dtype, source)
    result = QuantizedLayers(layers_path)
    progress = tqdm(layers, desc="GPTQ", unit="layer", leave=False,
                    disable=not parallel.is_main)
    for index, layer in enumerate(progress):
        prefix = f"{layers_path}.{index}"
        source.fetch(index, layer)
        restore = layer_to(layer, device, dtype)
        runner = LayerRunner(layer, inputs, device, index)
        modules = dict(layer.named_modules())
        groups = linear_groups(layer, family, functools.partial(runner.forward, 0))
        groups = [kept for g in groups
                  if (kept := [n for n in g
                               if not is_skipped(f"{prefix}.{n}", options.skip_modules)])]
        stages = [[g] for g in groups] if options.true_sequential else [groups]
        for stage in stages:
            hooks = _HessianHooks(modules, stage, device, timer)
            try:
                with timer.phase("forwards"):
                    for i in range(len(inputs.hidden)):
                        hooks.fired.clear()
                        try:
                            runner.forward(i)
                        except _StopForward:
                            pass
            finally:
                hooks.remove()
            with _reduce_phase(timer, parallel):
                owners = parallel.reduce_hessians(hooks.hessians, hooks.rows, modules, stage,
                                                  index)
            give_back_freed_memory()  # the forwards' activations, before the solves
            for group in stage:
                # float32 for the solver; the float64 sum is freed before the solve starts
                hessian = hooks.hessians.pop(group[0]).float()
                if parallel.solves(owners[group[0]]):
                    _solve_group(modules, group, prefix, hessian, hooks.rows[group[0]], spec,
                                 options.solver, timer, result)
                del hessian
                give_back_freed_memory()  # the solve's freed temporaries, before the next
                with _reduce_phase(timer, parallel):
                    parallel.share_group(modules, group, prefix, owners[group[0]], result)
            del hooks
        with timer.phase("forwards"):
            inputs.hidden = runner.outputs(act_device)
        layer_back(restore)
        errors = [r for r in result.reports if r.name.startswith(prefix + ".")]
        source.release(index, layer, result)
        progress.set_postfix(error=f"{sum(r.error for r in errors) / len(errors):.4g}")
    progress.close()
    return result
