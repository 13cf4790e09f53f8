"""The merged model's README.md: Hub metadata, method, recipe and each model's calibration settings.

Written without any network call (mergekit's own card generator queries the Hub for relative local paths).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

from huggingface_hub import ModelCardData

from .recipe import Recipe

_PIPELINE_TAGS = {"ForSequenceClassification": "text-classification", "ForCausalLM": "text-generation"}
_METHOD_TEXT = {
    "fisher_mask": (
        "[Fisher Mask Nodes](https://arxiv.org/abs/2403.09891): each model's parameters are weighted by the Fisher "
        "information of the attention-head and FFN-neuron mask nodes that scale them, "
        "`theta = sum_k l_k F_k theta_k / sum_k l_k F_k`."
    ),
    "fisher": (
        "[Fisher-weighted averaging](https://arxiv.org/abs/2111.09832) (Matena & Raffel): every parameter is "
        "weighted by its own diagonal Fisher information."
    ),
}


def _pipeline_tag(staging: Path) -> Optional[str]:
    config = json.loads((staging / "config.json").read_text())
    architecture = (config.get("architectures") or [""])[0]
    architecture = architecture.replace("LMHeadModel", "ForCausalLM")
    return next((tag for suffix, tag in _PIPELINE_TAGS.items() if architecture.endswith(suffix)), None)


def _is_hub_id(reference: str) -> bool:
    return not os.path.exists(reference) and reference.count("/") == 1 and not reference.startswith((".", "/"))


def write_model_card(staging: Path, recipe: Recipe, provenance: Dict[str, dict], *, heads_from: Optional[str]) -> None:
    """Write README.md and mergekit_config.yml (the user's recipe, verbatim) into the merged folder."""
    models = list(dict.fromkeys(recipe.model_references()))
    data = ModelCardData(
        base_model=[m for m in models if _is_hub_id(m)] or None,
        tags=["merge", "mergekit", "fisher-mask"],
        library_name="transformers",
        pipeline_tag=_pipeline_tag(staging),
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        f"# {Path(recipe.path).stem} merge",
        "",
        "Merged with [mergekit](https://github.com/arcee-ai/mergekit) and `mergekit-fisher-mask` using "
        f"the `{recipe.method}` method. {_METHOD_TEXT.get(recipe.method, '')}",
        "",
        "## Models",
        "",
    ]
    lines += [f"- `{m}`" for m in models]
    if heads_from:
        lines += ["", f"The task head and config come from `{heads_from}`; all other tensors are merged."]
    if provenance:
        lines += [
            "",
            "## Calibration",
            "",
            "| model | data | samples | estimator | loss | Fisher summary |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `{m}` | `{p['data']}` | {p['samples']} | {p['estimator']} | {p['loss']} | {p.get('summary', '')} |"
            for m, p in provenance.items()
        ]
    lines += ["", "## Recipe", "", "```yaml", recipe.source_text.rstrip(), "```", ""]
    (staging / "README.md").write_text("\n".join(lines), encoding="utf-8")
    (staging / "mergekit_config.yml").write_text(recipe.source_text, encoding="utf-8")
