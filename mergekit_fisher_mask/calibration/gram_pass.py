"""The Gram pass (RegMean): ``sum_t x_t x_t^T`` of each measured linear layer input over the real tokens of the data.

A forward-only pass with a forward pre-hook on each input's module (the architecture table's ``grams``): q, k and
v share one input, and so do gate and up, so each is measured once; fused projections (GPT-2's Conv1D ``c_attn``,
Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``, ModernBERT's ``Wqkv``) are one input. Only real tokens count
(``attention_mask``), never padding. Sums are float32 on each layer's execution device, gathered to the CPU once, so
device maps, CPU and disk offload and data parallelism work as for the mask pass. Routed experts of mixtures have
no Gram: the merge takes them by its ``nonlinear`` rule and says so.

The hooks are a :class:`~.engine.Rider`: the mask pass can carry them (``calibrate(..., gram_out=...)``), so one
pass over the data measures the mask Fisher and the Grams of the same examples, saving the Gram pass's forwards.
Only the forward of each micro-batch counts, never a recompute under activation checkpointing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..architectures import get_architecture
from ..errors import FisherMaskError
from ..files.gram import GramInput, GramStats
from ..settings import CalibrationSettings
from .engine import CalibrationPass, PassContext, PreparedCalibration, run_pass, with_overrides
from .losses import Batch, model_inputs
from .masks import layer_modules

_ROWS = 4096  # tokens per Gram update: bounds the float32 copy of the inputs at large widths


class _GramHook:
    """Adds a micro-batch's real-token inputs of one module to its Gram sum (on the input's device)."""

    def __init__(self, owner: "GramInputs", name: str):
        self.owner, self.name = owner, name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.owner.tokens is None:
            return
        x = args[0].detach()  # riding a pass with gradients: the sum is no part of its graph
        real = self.owner.tokens.to(x.device)  # (B * T,) bool
        flat = x.reshape(-1, x.shape[-1])  # (B * T, d) for (B, T, d) and flattened inputs alike
        if flat.shape[0] == real.shape[0]:
            rows = flat[real].float()  # (n, d): the real tokens
        elif flat.shape[0] == int(real.sum()):
            rows = flat.float()  # an unpadded layer (padding already removed by the model)
        else:
            raise FisherMaskError(f"{self.name}: its input has {flat.shape[0]} rows for {real.shape[0]} token slots.")
        total = self.owner.sums.get(self.name)
        if total is None:
            total = self.owner.sums[self.name] = torch.zeros(rows.shape[1], rows.shape[1], device=x.device)
        for start in range(0, rows.shape[0], _ROWS):
            part = rows[start : start + _ROWS]
            total.addmm_(part.T, part)  # (d, n) @ (n, d)
        self.owner.counts[self.name] = self.owner.counts.get(self.name, 0) + rows.shape[0]


class GramInputs:
    """Context manager that hooks every measured input of a model and removes the hooks on exit, even after an
    error; ``inputs`` says, per Gram (the full module name), which weights (full tensor names) read it."""

    def __init__(self, model: nn.Module, sites: Optional[Tuple[str, ...]] = None):
        self.model, self.sites = model, sites
        self.tokens: Optional[torch.Tensor] = None  # (B * T,) real tokens of the batch being run; None: not counting
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}
        self.inputs: Dict[str, Tuple[Tuple[str, ...], int]] = {}
        self._reduced: Optional[Dict[str, torch.Tensor]] = None
        self._handles: List = []

    def __enter__(self) -> "GramInputs":
        spec = get_architecture(self.model.config.model_type)
        names = {id(module): name for name, module in self.model.named_modules()}
        try:
            for stack in spec.stacks:
                if not stack.grams:
                    raise FisherMaskError(
                        f"RegMean's Gram pass is not implemented for {spec.name} ({stack.name or 'its'} layers). "
                        "Merge it with fisher_mask instead."
                    )
                for layer in layer_modules(self.model, stack):
                    prefix = names[id(layer)]
                    for site, gram in stack.grams.items():
                        if self.sites is not None and site not in self.sites:
                            continue
                        name = f"{prefix}.{gram.module}"
                        self.inputs[name] = (tuple(f"{prefix}.{w}" for w in gram.weights), gram.input_axis)
                        hook = _GramHook(self, name)
                        self._handles.append(layer.get_submodule(gram.module).register_forward_pre_hook(hook))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.tokens = None

    @contextlib.contextmanager
    def observing(self, batch: Batch) -> Iterator[None]:
        """Count the inputs of the forwards run in the block: the real tokens of ``batch``, as it is passed to the
        model."""
        self.tokens = batch["attention_mask"].flatten().bool()  # (B * T,)
        try:
            yield
        finally:
            self.tokens = None

    def collect(self) -> Dict[str, torch.Tensor]:
        """Gram sums and token counts (as one-element tensors, so that one reduce sums both) on the CPU."""
        out = {}
        for name, (weights, _) in self.inputs.items():
            if name not in self.sums:
                raise FisherMaskError(f"The forward pass never reached {name}; a custom model must run every layer.")
            out[name] = self.sums[name].cpu()
            out[f"{name}#tokens"] = torch.tensor([float(self.counts[name])], dtype=torch.float64)
        return out

    def receive(self, sums: Dict[str, torch.Tensor]) -> None:
        self._reduced = dict(sums)

    def fields(self, settings: CalibrationSettings) -> Dict[str, Any]:
        """The :class:`GramStats` fields of the reduced sums: the Grams (float32, CPU), each input's
        :class:`GramInput` (real-token count and the weights that read it) and the storage dtype."""
        if self._reduced is None:
            raise FisherMaskError("The Gram sums are read after a pass has run with these hooks.")
        sums = dict(self._reduced)
        inputs = {name: GramInput(int(sums.pop(f"{name}#tokens").item()), weights, axis)
                  for name, (weights, axis) in self.inputs.items()}
        return {"grams": sums, "inputs": inputs, "gram_dtype": settings.gram_dtype.value}


def check_sites(settings: CalibrationSettings, spec) -> Optional[Tuple[str, ...]]:
    """The settings' ``gram_inputs`` (None: every input of the table), refused if the architecture lacks one."""
    sites = settings.gram_inputs
    if sites is None:
        return None
    known = sorted({site for stack in spec.stacks for site in stack.grams})
    unknown = [site for site in sites if site not in known]
    if unknown:
        raise FisherMaskError(f"gram_inputs {', '.join(unknown)} unknown for {spec.name}; it has {', '.join(known)}.")
    return tuple(sites)


def _gram_pass(model, dataloader, settings: CalibrationSettings, accelerator, progress: bool):
    """The forward-only pass: the :class:`GramStats` fields and N."""
    context = PassContext.of(model, settings, check=False)  # a forward statistic: no estimator, no labels
    with GramInputs(model, check_sites(settings, context.spec)) as hooks, torch.no_grad():

        def step(batch: Batch) -> None:
            with hooks.observing(batch):
                model(**model_inputs(batch))

        _, count = run_pass(model, dataloader, step, dict, context=context, accelerator=accelerator,
                            description="Gram matrices", progress=progress, average=False, rider=hooks)
        return hooks.fields(settings), count


def compute_gram(
    model, dataloader, settings: Optional[CalibrationSettings] = None, *, accelerator=None, progress: bool = True,
    **overrides,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, GramInput], int]:
    """Return ``(sums, inputs, N)``: each measured input's Gram sum ``sum_t x_t x_t^T`` (float32, on the CPU, summed
    over every process), its :class:`GramInput` (real-token count and the weights that read it), and the number of
    examples N. The settings' ``gram_inputs`` chooses which inputs are measured (default: all in the table)."""
    fields, count = _gram_pass(model, dataloader, with_overrides(settings, overrides), accelerator, progress)
    return fields["grams"], fields["inputs"], count


def measure(run: PreparedCalibration, *, progress: bool = True):
    """The Gram pass over a prepared run: the fields of its :class:`GramStats` and N."""
    return _gram_pass(run.model, run.loader, run.settings, run.accelerator, progress)


def check_gram_supported(config, settings: CalibrationSettings) -> None:
    spec = get_architecture(config.model_type)
    if any(not stack.grams for stack in spec.stacks):
        raise FisherMaskError(
            f"RegMean (--gram) is not implemented for {spec.name}: its encoder-decoder layers have inputs from two "
            "stacks. Merge it with fisher_mask instead."
        )
    check_sites(settings, spec)


def _gram_bytes(model_dir, config, settings: CalibrationSettings) -> int:
    """Bytes of the Gram folder: d_in^2 numbers per measured input and layer."""
    from ..architectures import NodeShape

    shape = NodeShape.from_config(config)
    width = {"attn_in": shape.hidden_size, "attn_out": shape.num_heads * shape.head_dim, "ffn_in": shape.hidden_size,
             "ffn_out": shape.intermediate_size}
    spec = get_architecture(config.model_type)
    sites = settings.gram_inputs or [site for stack in spec.stacks for site in stack.grams]
    per_layer = sum(width.get(site, shape.hidden_size) ** 2 for site in sites)
    return per_layer * (shape.num_layers + shape.num_decoder_layers) * (4 if settings.gram_dtype.value == "float32" else 2)


PASS = CalibrationPass(record=GramStats, measure=measure, description="Gram matrices", check=check_gram_supported,
                       output_bytes=_gram_bytes, uses_loss=False, reads=frozenset({"gram_inputs", "gram_dtype"}))
