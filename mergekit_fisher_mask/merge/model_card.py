"""The merged model's README.md: Hub metadata, method, recipe and each model's calibration settings.

Written without any network call (mergekit's own card generator queries the Hub for relative local paths).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

from huggingface_hub import ModelCardData

from ..errors import FisherMaskError
from ..outputs import write_text
from ..tasks import task_of
from .methods import PLUGIN_METHODS
from .recipe import Recipe


def _pipeline_tag(config) -> Optional[str]:
    try:
        return task_of(config).pipeline_tag
    except FisherMaskError:  # a bare body without a task head
        return None


def _shown(source) -> str:
    """A data source as a published card shows it: a local file by its name (not the path on this machine)."""
    return Path(source).name if source and os.path.isabs(str(source)) else str(source)


def _is_hub_id(reference: str) -> bool:
    return not os.path.exists(reference) and reference.count("/") == 1 and not reference.startswith((".", "/", "~"))


def write_model_card(
    staging: Path, recipe: Recipe, provenance: Dict[str, dict], *, config, heads_from: Optional[str]
) -> None:
    """Write README.md and mergekit_config.yml (the user's recipe, verbatim) into the merged folder; ``config`` is
    the output model's HF config."""
    models = list(dict.fromkeys(recipe.model_references()))
    plugin = PLUGIN_METHODS.get(recipe.method)
    data = ModelCardData(
        base_model=[m for m in models if _is_hub_id(m)] or None,
        tags=["merge", "mergekit", "fisher-mask"],
        library_name="transformers",
        pipeline_tag=_pipeline_tag(config),
    )
    method = f" {plugin.card_text()}" if plugin else ""
    lines = [
        "---",
        data.to_yaml(),
        "---",
        f"# {Path(recipe.path).stem} merge",
        "",
        "Merged with [mergekit](https://github.com/arcee-ai/mergekit) and `mergekit-fisher-mask` using "
        f"the `{recipe.method}` method.{method}",
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
            "| model | data | samples | estimator | loss | summary |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `{m}` | `{_shown(p['data'])}` | {p['samples']} | {p['estimator']} | {p['loss'] or '-'} | "
            f"{p.get('summary', '')} |"
            for m, p in provenance.items()
        ]
    lines += ["", "## Recipe", "", "```yaml", recipe.source_text.rstrip(), "```", ""]
    write_text(staging / "README.md", "\n".join(lines))
    write_text(staging / "mergekit_config.yml", recipe.source_text)
