"""Calibrate a model on data and write its Fisher file: every check first, then load, measure, write atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from ..architectures import ArchitectureSpec, NodeShape, get_architecture
from ..checkpoints import has_tokenizer, load_config, model_fingerprint, resolve_model_dir
from ..errors import ModelLoadError, SettingsError
from ..files import MaskFisher, is_full_fisher_dir, is_mask_fisher_file, save_full_fisher, save_mask_fisher
from ..outputs import check_no_overlap, check_replaceable
from ..settings import CalibrationSettings, make_settings
from ..tasks import Task, task_of
from .data import CalibrationDataset, encode_labels, prepare_tokenizer, select_examples
from .engine import check_estimator
from .full_pass import check_full_supported, compute_full_fisher
from .mask_pass import compute_mask_fisher
from .placement import accelerator_type, load_model

LOG = logging.getLogger(__name__)

SettingsLike = Union[CalibrationSettings, Mapping[str, Any], None]
# Tasks whose data carries labels (language models predict their own text; QA data always holds answers).
_LABELLED = (Task.CLASSIFICATION, Task.REGRESSION, Task.TOKEN_CLASSIFICATION)


@dataclass
class PreparedCalibration:
    """A loaded model and its sharded, tokenized calibration data, ready for a pass (see :func:`prepare_calibration`)."""

    model_dir: Path
    model: torch.nn.Module
    loader: Any
    description: Dict[str, Any]
    accelerator: Any
    settings: CalibrationSettings
    task: Task
    offload_dir: Optional[Path] = None

    def cleanup(self) -> None:
        """Remove this run's own offload folder (inside ``--offload-folder``), if any."""
        if self.offload_dir is not None:
            shutil.rmtree(self.offload_dir, ignore_errors=True)
            self.offload_dir = None


def make_accelerator():
    """An Accelerator for calibration under any ``accelerate launch`` configuration."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    # Launched as several processes on a machine without GPUs, accelerate only picks CPU data parallelism (gloo)
    # when told cpu=True; otherwise each process would silently calibrate on everything.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator_type() in (None, "mps")  # MPS: one process
    # even_batches=False: padding the last batch with repeated examples would count them twice.
    return Accelerator(cpu=multi_cpu, dataloader_config=DataLoaderConfiguration(even_batches=False))


def effective_max_length(requested: int, spec: ArchitectureSpec, config, where: str) -> int:
    """Cap ``max_length`` at what the model's positions allow (saying so once); warn past a rotary model's length."""
    limit, hard = spec.position_limit(config)
    if limit is None or requested <= limit:
        return requested
    if hard:
        LOG.warning("%s: max_length %d is more than the model's %d positions; using %d.", where, requested, limit, limit)
        return limit
    LOG.warning(
        "%s: max_length %d is more than the %d positions the model was trained on; longer examples run, but the "
        "model may behave unlike it does in use.",
        where, requested, limit,
    )
    return requested


def _settings(settings: SettingsLike) -> CalibrationSettings:
    if settings is None:
        return CalibrationSettings()
    return settings if isinstance(settings, CalibrationSettings) else make_settings(settings)


def prepare_calibration(
    model: Union[str, os.PathLike],
    data: str,
    settings: SettingsLike = None,
    accelerator=None,
    *,
    attn_implementation: Optional[str] = None,
) -> PreparedCalibration:
    """Resolve the model, select and tokenize the data (checked before any weight is loaded), load the model as the
    settings place it, and shard the data over processes. For custom passes; call ``cleanup()`` when done."""
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    settings = _settings(settings)
    accelerator = accelerator or make_accelerator()
    model_dir = resolve_model_dir(str(model))
    config = load_config(model_dir)
    spec = get_architecture(config.model_type, where=str(model_dir))
    task = task_of(config, where=str(model_dir))
    check_estimator(settings.estimator, task)
    examples = select_examples(
        data,
        samples=settings.samples,
        seed=settings.seed,
        task=task,
        text_columns=settings.text_columns,
        label_column=settings.label_column,
        target_column=settings.target_column,
        needs_labels=task in _LABELLED and settings.estimator.uses_labels,
    )
    labels = encode_labels(examples, config, source=data) if examples.labels is not None else None
    max_length = effective_max_length(settings.max_length, spec, config, str(model_dir))
    if not has_tokenizer(model_dir):
        raise ModelLoadError(
            f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab files). Save the "
            "tokenizer next to the model with tokenizer.save_pretrained."
        )
    # Byte-level BPE tokenizers (RoBERTa, GPT-2, DeBERTa) need a prefix space to tokenize pre-split words.
    options = {"add_prefix_space": True} if task == Task.TOKEN_CLASSIFICATION else {}
    try:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir, **options), config.pad_token_id)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{model_dir}: cannot load its tokenizer ({str(error).splitlines()[0]}).") from error
    dataset = CalibrationDataset(examples, tokenizer, max_length=max_length, labels=labels, source=data)
    if task == Task.CAUSAL_LM:
        dataset.keep_scorable(source=data)
    net, offload_dir = load_model(model_dir, config, settings, accelerator, attn_implementation=attn_implementation)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, collate_fn=dataset.collate)
    # A device-mapped model takes its batches on its input device (the pass moves them), not on accelerator.device.
    loader = accelerator.prepare_data_loader(loader, device_placement=not settings.device_map)
    description = {
        **examples.description,
        "max_length": max_length,
        "settings": settings.model_dump(mode="json"),
        "processes": accelerator.num_processes,
    }
    return PreparedCalibration(model_dir, net, loader, description, accelerator, settings, task, offload_dir)


@contextlib.contextmanager
def _library_progress(show: bool):
    """Hide the progress bars of transformers (weight loading) and datasets (reading the data) when ours are off;
    their global switches are restored afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    switches = [(hf_logging.is_progress_bar_enabled, hf_logging.disable_progress_bar, hf_logging.enable_progress_bar),
                (datasets.is_progress_bar_enabled, datasets.disable_progress_bars, datasets.enable_progress_bars)]
    hidden = []
    for enabled, disable, enable in switches:
        if not show and enabled():
            disable()
            hidden.append(enable)
    try:
        yield
    finally:
        for enable in hidden:
            enable()


@contextlib.contextmanager
def _checked_run(model, data, out, settings: SettingsLike, accelerator, *, overwrite: bool, full: bool, progress: bool,
                 **options):
    """Validate the settings and the output path (before any work), prepare the run, and clean up after it; yields
    the run and the output claim to publish with. Library progress bars follow ``progress``."""
    settings = _settings(settings)
    with _library_progress(progress):
        model_dir = resolve_model_dir(str(model))  # the one download of a Hub id
        if full:
            check_full_supported(load_config(model_dir))
        if full and settings.device_map:
            raise SettingsError(
                "The full Fisher needs the whole model on one device (a per-example gradient of every parameter), so "
                "it does not take --device-map. Calibrate the mask Fisher with --device-map instead, or drop "
                "--device-map."
            )
        check_no_overlap(out, {"the model folder": model_dir}, option="--out")
        what, is_ours = ("a full Fisher", is_full_fisher_dir) if full else ("a mask-Fisher file", is_mask_fisher_file)
        claim = check_replaceable(out, overwrite=overwrite, is_ours=is_ours, what=what, folder=full, option="--out")
        run = prepare_calibration(str(model_dir), data, settings, accelerator, **options)
        try:
            yield run, claim
        finally:
            run.cleanup()


def _provenance(run: PreparedCalibration, model, count: int) -> Dict[str, Any]:
    """What both Fisher formats record about where a Fisher came from."""
    return {
        "fingerprint": model_fingerprint(run.model_dir),
        "model": str(model),
        "samples": count,
        "estimator": run.settings.estimator.value,
        "loss": run.task.loss.value,
        "dtype": str(run.model.dtype).removeprefix("torch."),
        "data": run.description,
    }


def calibrate(
    model: Union[str, os.PathLike],
    data: str,
    out: Union[str, os.PathLike],
    settings: SettingsLike = None,
    *,
    overwrite: bool = False,
    accelerator=None,
    progress: bool = True,
) -> MaskFisher:
    """Measure the mask Fisher of ``model`` (folder or Hub id) on ``data``, write it to ``out``, return it.

    ``out`` may replace an existing mask-Fisher file only with ``overwrite``; any other existing file, or a path
    inside the model's folder, is refused before any work. Runs under any ``accelerate launch`` configuration; only
    the main process writes the file.
    """
    with _checked_run(model, data, out, settings, accelerator, overwrite=overwrite, full=False, progress=progress) as (
        run, claim
    ):
        groups, count = compute_mask_fisher(
            run.model,
            run.loader,
            estimator=run.settings.estimator,
            accelerator=run.accelerator,
            seed=run.settings.seed,
            progress=progress,
            mixed_precision=run.settings.mixed_precision,
            micro_batch_size=run.settings.micro_batch_size,
            aggregate=run.settings.aggregate,
        )
    fisher = MaskFisher(groups=groups, shape=NodeShape.from_config(run.model.config), **_provenance(run, model, count))
    if run.accelerator.is_main_process:
        save_mask_fisher(fisher, out, claim)
    run.accelerator.wait_for_everyone()
    return fisher


def calibrate_full(
    model: Union[str, os.PathLike],
    data: str,
    out: Union[str, os.PathLike],
    settings: SettingsLike = None,
    *,
    overwrite: bool = False,
    accelerator=None,
    progress: bool = True,
):
    """Measure the full diagonal Fisher of every parameter and write it as a sharded folder ``out``.

    Returns ``(fisher dict, samples)``. The settings' ``chunk_size`` examples' gradients are held at once. The same
    output rules as :func:`calibrate` apply, for a folder.
    """
    # Eager attention is plain matmuls that vmap batches; SDPA has no batching rule on CPU and would be looped.
    options = {"attn_implementation": "eager"}
    with _checked_run(model, data, out, settings, accelerator, overwrite=overwrite, full=True, progress=progress,
                      **options) as (run, claim):
        fisher, count = compute_full_fisher(
            run.model,
            run.loader,
            estimator=run.settings.estimator,
            accelerator=run.accelerator,
            chunk_size=run.settings.chunk_size,
            seed=run.settings.seed,
            progress=progress,
            mixed_precision=run.settings.mixed_precision,
        )
    provenance = _provenance(run, model, count)
    metadata = {key: json.dumps(value, sort_keys=True) if key == "data" else str(value) for key, value in provenance.items()}
    metadata["model_type"] = run.model.config.model_type
    if run.accelerator.is_main_process:
        save_full_fisher(fisher, run.model_dir, out, metadata, claim)
    run.accelerator.wait_for_everyone()
    return fisher, count
