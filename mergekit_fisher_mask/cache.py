"""The calibration cache of ``mergekit-fisher merge``: statistic files measured from a recipe's ``calibration_data``.

A cached file is keyed by what its result depends on: the model's fingerprint, the data (and its file's size and
time) and the settings that change the result, with ``dtype: auto`` resolved for this machine; placement
(device map, micro-batches) is left out. :func:`calibrate_missing` plans every calibration a merge needs before it
runs any of them, so a missing data file of the last model stops the merge before the first model is calibrated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Dict, Iterable, Mapping

from .calibration.api import PASSES, measure_statistic, plan_calibration
from .calibration.placement import accelerator_type
from .checkpoints import model_fingerprint
from .outputs import check_writable
from .paths import user_path

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputModel:
    """A model a recipe names: its reference as written, its folder here, and its HF config."""

    reference: str
    directory: Path
    config: object

    @cached_property
    def fingerprint(self) -> str:
        """Computed once per merge: it keys the calibration cache and checks each statistic file."""
        return model_fingerprint(self.directory)


def default_cache_dir() -> Path:
    """``$MERGEKIT_FISHER_CACHE``, else ``$XDG_CACHE_HOME/mergekit-fisher-mask``, else ``~/.cache/...``."""
    root = os.environ.get("MERGEKIT_FISHER_CACHE")
    if root:
        return user_path(root)
    return user_path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "mergekit-fisher-mask"


def cache_key(request, model: InputModel) -> str:
    """What a cached calibration depends on (see the module docstring)."""
    stamp = None
    if os.path.isfile(request.data):
        stat = os.stat(request.data)
        stamp = [stat.st_size, stat.st_mtime_ns]
    settings = request.settings.result_fields()
    settings["dtype"] = request.settings.dtype.resolve(model.config, on_gpu=accelerator_type() is not None)
    payload = {"fingerprint": model.fingerprint, "data": request.data, "stamp": stamp, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(cache_dir: Path, record: type, key: str) -> Path:
    """``<kind>-<key>.safetensors`` for a file format, ``<kind>-<key>`` for a folder format."""
    kind = record.FORMAT.rsplit("/", 1)[-1]
    return cache_dir / (f"{kind}-{key}" if record.OUTPUT.folder else f"{kind}-{key}.safetensors")


def calibrate_missing(
    requests: Iterable, inputs: Mapping[str, InputModel], cache_dir: Path, record: type, *, progress: bool = True
) -> Dict[tuple, str]:
    """Measure (into the cache) the ``record`` statistic of every requested model that has none cached yet; return
    ``{recipe location: path}`` for every request. All missing calibrations are planned (data read and checked)
    before the first one runs."""
    paths, missing = {}, []
    for request in requests:
        path = cache_path(cache_dir, record, cache_key(request, inputs[request.model]))
        paths[request.location] = str(path)
        if record.OUTPUT.is_ours(path):
            LOG.info("Using the cached %s of %s: %s", record.noun(), request.model, path)
        else:
            missing.append((request, path))
    if missing:
        check_writable(cache_dir, name="cache_dir", is_folder=True)
    uses_loss = PASSES[record].uses_loss
    plans = [(request, path, plan_calibration(inputs[request.model].directory, request.data, request.settings,
                                              uses_loss=uses_loss)) for request, path in missing]
    for request, path, plan in plans:
        LOG.info("Calibrating %s on %s -> %s", request.model, request.data, path)
        # The cache is ours: a run that filled the same key meanwhile wrote the same result, so replace it.
        measure_statistic(record, inputs[request.model].directory, request.data, path, request.settings,
                          overwrite=True, progress=progress, plan=plan, out_name="cache_dir")
    return paths
