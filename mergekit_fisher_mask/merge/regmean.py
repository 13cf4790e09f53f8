"""Merge method ``regmean`` (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

For a linear layer ``y = W x`` each model k brings the per-token mean Gram ``G_k = (1/N_k) sum_t x_t x_t^T`` of that
layer's input on its own data (:mod:`mergekit_fisher_mask.files.gram`). The merge is the least-squares solution

    W^T = (sum_k l_k G~_k + r I)^-1 (sum_k l_k G~_k W_k^T + r W_avg^T),   G~_k = a G_k + (1 - a) diag(G_k)

``a`` (``alpha``) scales the off-diagonal entries; ``r = ridge * mean(diag(sum_k l_k G~_k))`` is a relative ridge
that pulls ill-conditioned directions towards the ``l``-weighted average ``W_avg`` (so merging a model with itself
still gives the model). ``alpha = 0`` is the per-input-channel weighted mean
``W[:, i] = sum_k l_k G_k[i, i] W_k[:, i] / sum_k l_k G_k[i, i]``. The system is solved by Cholesky, never by an
explicit inverse, in float64 for inputs up to 4096 wide (float32 beyond), on the device mergekit gives (``--cuda``).
A sum that is singular even with the ridge is solved with a larger one, and the log says so.

Tensors that are not linear-layer weights with a Gram (embeddings, norms, biases, routers, routed experts) are
merged by ``nonlinear``: the ``l``-weighted mean (the paper's rule) or the base model's tensor. ``scale`` (with a
base model) multiplies the merge's change from the base, as task arithmetic's lambda does.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
from typing import Optional, Sequence, Tuple

import torch
from mergekit.merge_methods import BasePolicy, InputContract, PerInput, TensorGroup, merge_method
from pydantic import Field
from typing_extensions import Annotated

from ..architectures import get_architecture
from ..errors import FisherFileError, FisherMaskError
from ..files.gram import GRAM_INDEX, GramStats
from .kernels import base_copy, file_stamp, members, positive_lambdas, weighted_average

LOG = logging.getLogger(__name__)
FLOAT64_UP_TO = 4096  # input widths solved in float64; wider ones in float32 (a 14336-wide float64 system is 1.6 GB)
_RIDGE_STEPS = 8  # tenfold ridge increases tried on a sum that is still not positive definite


class Nonlinear(str, enum.Enum):
    """How ``regmean`` merges tensors that have no Gram."""

    AVERAGE = "average"  # the l-weighted mean, as `linear` (the paper's rule)
    BASE = "base"  # the base model's tensor, unchanged


@functools.lru_cache(maxsize=256)
def _cached_grams(path: str, stamp: Tuple[int, int]) -> GramStats:
    return GramStats.read(path)


def gram_stats(path: str) -> GramStats:
    """Open (once per folder version) a Gram folder; its matrices are read on demand."""
    return _cached_grams(os.path.abspath(path), file_stamp(os.path.join(path, GRAM_INDEX)))


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    LOG.warning(message)


def regularized(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a G + (1 - a) diag(G)``: off-diagonal entries scaled by ``alpha``, the diagonal kept (in place)."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha)
    gram.diagonal().copy_(diagonal)
    return gram


def solve(
    weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], lambdas: Sequence[float], *, alpha: float,
    ridge: float, input_axis: int, name: str,
) -> Optional[torch.Tensor]:
    """RegMean's solution for one weight (``input_axis`` 1: [out, in]; 0: [in, out]); None if no model saw data."""
    width = grams[0].shape[0]
    dtype = torch.float64 if width <= FLOAT64_UP_TO else torch.float32
    device = weights[0].device
    system = torch.zeros(width, width, dtype=dtype, device=device)  # sum_k l_k G~_k
    right = None  # sum_k l_k G~_k W_k^T, (in, out)
    average = None  # sum_k l_k W_k^T / sum_k l_k
    for weight, gram, lam in zip(weights, grams, lambdas):
        transposed = (weight.T if input_axis == 1 else weight).to(dtype)  # (in, out)
        scaled = regularized(gram.to(device=device, dtype=dtype), alpha)
        system.add_(scaled, alpha=lam)
        right = torch.mm(scaled, transposed).mul_(lam) if right is None else right.addmm_(scaled, transposed, alpha=lam)
        average = transposed.mul(lam) if average is None else average.add_(transposed, alpha=lam)
        del scaled
    average.div_(sum(lambdas))
    scale = float(system.diagonal().mean())
    if scale <= 0:
        return None
    # Cholesky of a singular sum may "succeed" with pivots that are round-off: treat pivots below this share of the
    # largest as singular too (float32's is larger: its round-off is).
    floor = 1e-12 if dtype == torch.float64 else 1e-6
    strength = ridge * scale
    for step in range(_RIDGE_STEPS + 1):
        factor, info = torch.linalg.cholesky_ex(system + strength * torch.eye(width, dtype=dtype, device=device))
        pivots = factor.diagonal()
        if int(info) == 0 and float(pivots.min()) ** 2 >= floor * float(pivots.max()) ** 2:
            break
        strength = max(strength * 10, scale * floor)
    else:
        raise FisherMaskError(f"regmean: the Gram sum of {name} is not positive definite even with a ridge of "
                              f"{strength / scale:.1e}; its Gram files hold no usable data.")
    if step:
        _say_once(f"regmean: the Gram sum of {name} (and perhaps others) is singular at ridge {ridge:g}; it was solved "
                  f"with a relative ridge of {strength / scale:.1e}. Raise `ridge` to silence this.")
    solution = torch.cholesky_solve(right.add_(average, alpha=strength), factor)  # (in, out)
    return (solution.T if input_axis == 1 else solution).to(weights[0].dtype)


def _is_projection(record: GramStats, name: str) -> bool:
    """Whether ``name`` is an in-layer projection of the table (so that having no Gram deserves a word)."""
    spec = get_architecture(record.shape.model_type)
    stack, _, rule = spec.locate(name)
    return stack is not None and rule is not None and rule.role.kind is not None and not name.endswith(".bias")


def regmean_merge(
    group: TensorGroup,
    weight: PerInput[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = 1.0,
    gram: PerInput[Optional[str]] = None,
    alpha: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.9,
    ridge: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-4,
    nonlinear: Nonlinear = Nonlinear.AVERAGE,
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0,
) -> torch.Tensor:
    """Merge one tensor: RegMean's least-squares solution for a linear weight with a Gram, else ``nonlinear``; with
    ``scale``, the merge's change from the base model is multiplied by it (as task arithmetic's lambda, times K)."""
    name = group.metadata.name or "<unnamed tensor>"
    if scale != 1.0 and group.base is None:
        raise FisherMaskError("regmean: scale multiplies the merge's change from the base model; it needs a base_model.")
    merged = _regmean_tensor(group, name, weight, gram, alpha, ridge, nonlinear)
    if scale != 1.0:
        base = group.base.tensor.to(merged.dtype)
        merged = base + scale * (merged - base)
    return merged


def _regmean_tensor(group: TensorGroup, name: str, weight, gram, alpha: float, ridge: float,
                    nonlinear: Nonlinear) -> torch.Tensor:
    entries = members(group, gram, "regmean", "gram")
    lambdas = positive_lambdas(entries, weight, "regmean", name)
    records = [gram_stats(gram[entry.id]) for entry in entries]
    inputs = [record.gram_for(name) for record in records]
    merged = None
    if any(found != inputs[0] for found in inputs):
        lacking = ", ".join(str(gram[entry.id]) for entry, found in zip(entries, inputs) if found is None)
        raise FisherFileError(
            f"regmean: {name} has a Gram in some folders and not in others ({lacking or 'names differ'}); were they "
            "calibrated with different gram_inputs, or on models of another architecture?"
        )
    if inputs[0] is not None:
        grams = [record.mean(inputs[0], where=gram[entry.id]) for record, entry in zip(records, entries)]
        shapes = {tuple(g.shape) for g in grams}
        axis = records[0].inputs[inputs[0]].input_axis
        if shapes != {(entries[0].tensor.shape[axis],) * 2}:
            raise FisherFileError(f"regmean: {name} has shape {tuple(entries[0].tensor.shape)}; its Gram matrices are "
                                  f"{sorted(shapes)}. The Gram folders were measured on differently shaped models.")
        merged = solve([entry.tensor for entry in entries], grams, lambdas, alpha=alpha, ridge=ridge,
                       input_axis=axis, name=name)
        if merged is None:
            _say_once(f"regmean: no model's Gram of {name} saw a token; merged by nonlinear={nonlinear.value}.")
    elif _is_projection(records[0], name):
        _say_once(f"regmean: {name} has no Gram (routed experts, or an input left out by gram_inputs); such tensors "
                  f"are merged by nonlinear={nonlinear.value}.")
    if merged is not None:
        return merged
    if nonlinear == Nonlinear.BASE:
        return base_copy(group, "regmean: nonlinear=base", name)
    return weighted_average(entries, list(lambdas))


REGMEAN = merge_method(
    regmean_merge,
    name="regmean",
    pretty_name="RegMean",
    reference_url="https://arxiv.org/abs/2212.09849",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=2),
)
