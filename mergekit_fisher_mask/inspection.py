"""``mergekit-fisher inspect``: what a Fisher file says, as numbers and as a picture of where each model wins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .errors import FisherMaskError
from .files import GRAM_INDEX, FullFisher, GramStats, MaskFisher
from .files.base import top_share
from .merge.expand import Normalize, normalized
from .outputs import PNG_IMAGE, claim_output, save_figure, staged_file

QUANTILES = 20  # columns of the neuron heatmap: quantiles of each layer's neuron Fisher


@dataclass(frozen=True)
class MaskSummary:
    """Numbers behind the text report of one mask-Fisher file (of its first head and neuron groups; all groups'
    concentration in ``shares``)."""

    head_mean: torch.Tensor  # (L,)
    head_max: torch.Tensor  # (L,)
    ffn_mean: torch.Tensor  # (L,)
    ffn_max: torch.Tensor  # (L,)
    top_heads: List[Tuple[int, int, float]]  # (layer, head, value), largest first
    shares: Dict[str, float]  # every group: share held by its top 10% of nodes


def main_groups(fisher: MaskFisher) -> Tuple[str, torch.Tensor, str, torch.Tensor]:
    """(key, (L, H)) of the first head group and (key, (L, K)) of the first neuron group (experts flattened)."""
    head_key = next(key for key in fisher.groups if key.endswith("head_fisher"))
    neuron_key = next((key for key in fisher.groups if key.endswith("ffn_fisher")), None) or "expert_fisher"
    return head_key, fisher.groups[head_key], neuron_key, fisher.groups[neuron_key].flatten(1)


def summarize_mask(fisher: MaskFisher, top_k: int = 10) -> MaskSummary:
    _, head, _, ffn = main_groups(fisher)
    heads = head.shape[1]
    values, order = head.flatten().topk(min(top_k, head.numel()))
    return MaskSummary(
        head_mean=head.mean(dim=1),
        head_max=head.amax(dim=1),
        ffn_mean=ffn.mean(dim=1),
        ffn_max=ffn.amax(dim=1),
        top_heads=[(int(i) // heads, int(i) % heads, float(v)) for v, i in zip(values, order)],
        shares={key: top_share(values) for key, values in fisher.groups.items()},
    )


def format_mask_summary(path: str, fisher: MaskFisher, top_k: int = 10) -> str:
    summary = summarize_mask(fisher, top_k)
    shape = fisher.shape
    head_key, _, neuron_key, _ = main_groups(fisher)
    experts = f", {shape.num_experts} experts x {shape.expert_size} neurons" if shape.num_experts else ""
    lines = [
        f"{path}",
        f"  model {fisher.model or '?'} ({shape.model_type}: {shape.num_layers} layers x {shape.num_heads} heads "
        f"[{shape.num_kv_heads} KV], {shape.intermediate_size} FFN neurons{experts})",
        f"  {fisher.samples} samples, estimator {fisher.estimator}, loss {fisher.loss}, data {fisher.data.get('source')}",
        "  concentration (share of each group's Fisher held by its top 10% of nodes): "
        + ", ".join(f"{key} {share:.1%}" for key, share in summary.shares.items()),
        "",
        f"  layer   {head_key} mean / max      {neuron_key} mean / max",
    ]
    for layer in range(len(summary.head_mean)):
        lines.append(
            f"  {layer:5d}   {summary.head_mean[layer]:.4e}  {summary.head_max[layer]:.4e}   "
            f"{summary.ffn_mean[layer]:.4e}   {summary.ffn_max[layer]:.4e}"
        )
    lines += ["", f"  top {len(summary.top_heads)} heads (layer.head: Fisher)"]
    lines += [f"    {layer}.{head}: {value:.4e}" for layer, head, value in summary.top_heads]
    return "\n".join(lines)


def format_full_summary(path: str) -> str:
    """Per-tensor summary of a full-Fisher folder, read one tensor at a time."""
    fisher = FullFisher.read(path)
    rows = []
    for name in fisher.tensors:
        values = fisher.tensors[name].double()
        rows.append((name, values.numel(), float(values.mean()), float(values.max()), float(values.sum())))
    total = sum(row[4] for row in rows) or 1.0
    lines = [
        f"{path}",
        f"  model {fisher.model or '?'} ({fisher.model_type}), {fisher.samples} samples, estimator {fisher.estimator}, "
        f"loss {fisher.loss}, L2 norm {fisher.l2_norm:.4e}",
        "",
        f"  {'tensor':<60} {'numel':>10} {'mean':>11} {'max':>11} {'share':>7}",
    ]
    lines += [f"  {n:<60} {k:>10} {m:>11.4e} {x:>11.4e} {s / total:>7.2%}" for n, k, m, x, s in rows]
    return "\n".join(lines)


def gram_summary(fisher: GramStats, name: str) -> Tuple[int, float, float]:
    """(width, trace, effective rank) of one input's per-token mean Gram; the effective rank ``tr(G)^2 / ||G||_F^2``
    is the number of equally strong directions that would give the same spread (1: one direction, d: isotropic)."""
    gram = fisher.mean(name, where=name).double()
    trace = float(gram.diagonal().sum())
    return gram.shape[0], trace, trace**2 / max(float((gram**2).sum()), 1e-300)


def format_gram_summary(path: str) -> str:
    """Per-input summary of a Gram folder, read one matrix at a time."""
    fisher = GramStats.read(path)
    lines = [
        f"{path}",
        f"  model {fisher.model or '?'} ({fisher.shape.model_type}), {fisher.samples} samples, "
        f"{len(fisher.inputs)} Gram matrices ({fisher.gram_dtype})",
        "",
        f"  {'input':<60} {'width':>6} {'tokens':>8} {'trace':>11} {'eff. rank':>9}",
    ]
    for name, entry in fisher.inputs.items():
        width, trace, rank = gram_summary(fisher, name)
        lines.append(f"  {name:<60} {width:>6} {entry.tokens:>8} {trace:>11.4e} {rank:>9.1f}")
    return "\n".join(lines)


def neuron_quantiles(ffn: torch.Tensor, count: int = QUANTILES) -> torch.Tensor:
    """(L, D) -> (L, count): each layer's neuron Fisher at evenly spaced quantiles, smallest to largest."""
    points = torch.linspace(0, 1, count, dtype=ffn.dtype)
    return torch.quantile(ffn, points, dim=1).T  # (count, L) -> (L, count)


def merge_shares(fishers: Sequence[MaskFisher], normalize: Normalize) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each model's share ``F_k / sum_j F_j`` of the merge weight: (K, L, H) for heads, (K, L, D) for neurons."""
    groups = [main_groups(f) for f in fishers]
    heads = torch.stack([normalized(head, normalize) for _, head, _, _ in groups])
    ffn = torch.stack([normalized(ffn, normalize) for _, _, _, ffn in groups])
    return heads / heads.sum(0).clamp_min(1e-30), ffn / ffn.sum(0).clamp_min(1e-30)


def plot_mask_fishers(
    fishers: Sequence[MaskFisher],
    labels: Sequence[str],
    out: Path,
    *,
    normalize: Normalize = Normalize.LAYER,
    dpi: int = 100,
) -> Tuple[int, int]:
    """Heatmaps per model (heads, neuron quantiles) on one log colour scale, plus who dominates the merge.

    Returns the PNG's (width, height) in pixels.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise FisherMaskError(
            "Plotting needs matplotlib: pip install 'mergekit-fisher-mask[plot]'"
        ) from error
    shapes = {(f.shape.num_layers, f.shape.num_heads, f.shape.intermediate_size) for f in fishers}
    if len(shapes) != 1:
        raise FisherMaskError(f"Files to plot side by side must come from models of one shape; got {sorted(shapes)}.")
    columns = len(fishers) + (1 if len(fishers) > 1 else 0)
    figure, axes = plt.subplots(2, columns, figsize=(4 * columns, 7), dpi=dpi, squeeze=False, layout="constrained")
    panels = [(head, neuron_quantiles(ffn)) for _, head, _, ffn in map(main_groups, fishers)]
    positive = torch.cat([torch.cat([h.flatten(), q.flatten()]) for h, q in panels])
    positive = positive[positive > 0]
    low, high = (float(positive.min()), float(positive.max())) if positive.numel() else (1e-12, 1.0)
    scale = LogNorm(vmin=low, vmax=max(high, low * 10))
    for column, ((heads, quantiles), label) in enumerate(zip(panels, labels)):
        image = axes[0, column].imshow(heads.clamp_min(low).numpy(), aspect="auto", cmap="viridis", norm=scale)
        axes[0, column].set(title=f"{label}\nhead Fisher", xlabel="head", ylabel="layer")
        axes[1, column].imshow(quantiles.clamp_min(low).numpy(), aspect="auto", cmap="viridis", norm=scale)
        axes[1, column].set(title="neuron Fisher quantiles", xlabel="quantile (0 -> 1)", ylabel="layer")
    figure.colorbar(image, ax=axes[:, : len(fishers)].ravel().tolist(), shrink=0.8, label="Fisher (log scale)")
    if len(fishers) > 1:
        head_share, ffn_share = merge_shares(fishers, normalize)
        colours = plt.get_cmap("tab10")
        for row, share in ((0, head_share), (1, neuron_quantiles_share(ffn_share))):
            winner = share.argmax(0)  # (L, N)
            strength = share.amax(0)
            rgba = torch.tensor([colours(int(k) % 10) for k in winner.flatten()]).view(*winner.shape, 4)
            rgba[..., 3] = strength  # opaque where one model takes (nearly) all of the weight
            axes[row, -1].imshow(rgba.numpy(), aspect="auto")
        axes[0, -1].set(title=f"largest merge weight F_k / sum F\n(normalize={normalize.value})", xlabel="head")
        axes[1, -1].set(title="neurons, grouped by winner", xlabel="neuron quantile")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours(k % 10)) for k in range(len(fishers))]
        axes[0, -1].legend(handles, labels, loc="upper right", fontsize=7)
    for axis in axes.flat:
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(figure, out, dpi=dpi)  # out may be a staging name without a suffix
    width, height = figure.canvas.get_width_height()
    plt.close(figure)
    return width, height


def neuron_quantiles_share(share: torch.Tensor) -> torch.Tensor:
    """(K, L, D) -> (K, L, QUANTILES): per layer, neurons grouped by winning model and sorted by share, subsampled."""
    order = (share.argmax(0) * 2 + share.amax(0)).argsort(dim=1)  # (L, D): winner first, then share in [0, 1]
    ranked = torch.gather(share, 2, order.unsqueeze(0).expand_as(share))  # (K, L, D)
    picks = torch.linspace(0, share.shape[2] - 1, QUANTILES).round().long()
    return ranked[:, :, picks]


def describe(paths: Sequence[str], top_k: int = 10) -> Dict[str, str]:
    """Text report for each file: mask-Fisher files, full-Fisher folders and Gram folders are all accepted."""
    reports = {}
    for path in paths:
        if Path(path).is_dir():
            reports[path] = format_gram_summary(path) if (Path(path) / GRAM_INDEX).is_file() else format_full_summary(path)
        else:
            reports[path] = format_mask_summary(path, MaskFisher.read(path), top_k)
    return reports


def plot_to_file(
    paths: Sequence[Path], out: Path, *, overwrite: bool = False, normalize: Normalize = Normalize.LAYER
) -> Callable[[], Tuple[int, int]]:
    """Check, before any work, that ``out`` may be written (never over an input; only over a PNG, with
    ``overwrite``), and return the function that draws the mask-Fisher files among ``paths`` into it."""
    masks = [Path(p) for p in paths if not Path(p).is_dir()]
    if not masks:
        raise FisherMaskError("--plot draws mask-Fisher files; full-Fisher and Gram folders have no node layout to draw.")
    claim = claim_output(out, PNG_IMAGE, overwrite=overwrite, inputs={f"the input {p} at": Path(p) for p in paths},
                         name="plot")

    def draw() -> Tuple[int, int]:
        with staged_file(out, claim) as staging:
            return plot_mask_fishers([MaskFisher.read(f) for f in masks], [f.stem for f in masks], staging,
                                     normalize=normalize)

    return draw
