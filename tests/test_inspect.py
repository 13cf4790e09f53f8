"""`mergekit-fisher inspect`: numbers match hand computation; the PNG is a valid image of the expected size."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import build_model

from mergekit_fisher_mask import MaskFisher, NodeShape, save_mask_fisher
from mergekit_fisher_mask.cli import main
from mergekit_fisher_mask.inspection import merge_shares, neuron_quantiles, summarize_mask, top_share
from mergekit_fisher_mask.merge.expand import Normalize


def fisher_file(path, seed, scale=1.0):
    model = build_model("llama")
    shape = NodeShape.from_config(model.config)
    generator = torch.Generator().manual_seed(seed)
    head = scale * torch.rand(shape.num_layers, shape.num_heads, generator=generator)
    ffn = scale * torch.rand(shape.num_layers, shape.intermediate_size, generator=generator)
    fisher = MaskFisher(groups={"head_fisher": head, "ffn_fisher": ffn}, shape=shape, fingerprint="x", samples=3, estimator="empirical", loss="l")
    save_mask_fisher(fisher, path)
    return fisher


def test_summary_numbers_match_hand_computation(tmp_path):
    fisher = fisher_file(tmp_path / "a.safetensors", seed=0)
    summary = summarize_mask(fisher, top_k=3)
    for layer in range(2):
        assert summary.head_mean[layer] == pytest.approx(sum(fisher.groups["head_fisher"][layer].tolist()) / 4, rel=1e-6)
        assert summary.ffn_max[layer] == pytest.approx(max(fisher.groups["ffn_fisher"][layer].tolist()))
    flat = sorted(((v, l, h) for l, row in enumerate(fisher.groups["head_fisher"].tolist()) for h, v in enumerate(row)), reverse=True)
    assert [(l, h) for _, l, h in flat[:3]] == [(l, h) for l, h, _ in summary.top_heads]
    # 8 heads: the top 10% is the single largest head.
    assert summary.shares["head_fisher"] == pytest.approx(flat[0][0] / sum(v for v, _, _ in flat), rel=1e-6)
    assert top_share(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])) == pytest.approx(0.1)


def test_merge_shares_and_quantiles(tmp_path):
    a = fisher_file(tmp_path / "a.safetensors", seed=0)
    b = fisher_file(tmp_path / "b.safetensors", seed=1, scale=100.0)
    heads, ffn = merge_shares([a, b], Normalize.NONE)
    torch.testing.assert_close(heads[1], b.groups["head_fisher"] / (a.groups["head_fisher"] + b.groups["head_fisher"]))
    torch.testing.assert_close(heads.sum(0), torch.ones_like(a.groups["head_fisher"]))
    layer_heads, _ = merge_shares([a, b], Normalize.LAYER)
    assert layer_heads[1].mean() < 0.9, "per-layer normalization removes the 100x scale advantage"
    quantiles = neuron_quantiles(a.groups["ffn_fisher"], count=5)
    torch.testing.assert_close(quantiles[:, 0], a.groups["ffn_fisher"].amin(dim=1))
    torch.testing.assert_close(quantiles[:, -1], a.groups["ffn_fisher"].amax(dim=1))


def test_cli_text_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    paths = [tmp_path / "sentiment.safetensors", tmp_path / "spam.safetensors"]
    for seed, path in enumerate(paths):
        fisher_file(path, seed)
    png = tmp_path / "heat.png"
    result = CliRunner().invoke(main, ["inspect", *map(str, paths), "--plot", str(png), "--top-k", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "top 10% of nodes): head_fisher" in result.output and "top 2 heads" in result.output
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (700, 1200)  # 2 rows x 7 in at 100 dpi; 3 columns (2 models + merge weights) x 4 in


def test_cli_full_fisher_summary(tmp_path):
    from mergekit_fisher_mask.files import FullFisher

    model = build_model("bert")
    fisher = {name: torch.full_like(p, 2.0) for name, p in model.named_parameters()}
    FullFisher(shape=NodeShape.from_config(model.config), samples=3, tensors=fisher).save(tmp_path / "full")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "full")], catch_exceptions=False)
    assert result.exit_code == 0
    total = sum(p.numel() for p in model.parameters())
    line = next(l for l in result.output.splitlines() if "classifier.weight" in l)
    share = model.classifier.weight.numel() / total
    assert f"{share:.2%}" in line and "2.0000e+00" in line


def test_plot_never_replaces_a_file_that_is_not_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    fisher_file(tmp_path / "a.safetensors", seed=0)
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("four years of work")
    png = tmp_path / "heat.png"

    def inspect(*args):
        return CliRunner().invoke(main, ["inspect", str(tmp_path / "a.safetensors"), *args], standalone_mode=False)

    (tmp_path / "old.png").write_text("not an image")
    for target, match in ((tmp_path / "old.png", "is not a PNG image"), (thesis, "ending in .png"),
                          (tmp_path / "a.safetensors", "ending in .png")):
        before = target.read_bytes()
        result = inspect("--plot", str(target), "--overwrite")
        assert result.exception is not None and match in str(result.exception)
        assert target.read_bytes() == before
    odd = tmp_path / "fisher.png"  # a Fisher file under a .png name: still an input, never a plot target
    odd.write_bytes((tmp_path / "a.safetensors").read_bytes())
    result = CliRunner().invoke(main, ["inspect", str(odd), "--plot", str(odd), "--overwrite"], standalone_mode=False)
    assert "is the input" in str(result.exception) and odd.read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert inspect("--plot", str(png)).exception is None and png.read_bytes()[:4] == b"\x89PNG"
    result = inspect("--plot", str(png))
    assert "already holds a PNG image. Pass --overwrite" in str(result.exception)
    assert inspect("--plot", str(png), "--overwrite").exception is None
    assert not list(tmp_path.glob(".*partial*")), "staging is never left behind"
