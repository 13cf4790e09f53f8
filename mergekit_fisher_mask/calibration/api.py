"""Calibrate a model on data and write its statistic file: every check first, then load, measure, write atomically.

The steps, each usable on its own:

1. :func:`plan_calibration` checks the settings against the model's task, selects and tokenizes the data and loads
   the tokenizer, all before any weight is read (a merge plans every calibration it needs before running any);
2. :func:`load_calibration` loads the model as the settings place it and shards the data over processes;
3. a :class:`~.engine.CalibrationPass` measures (:data:`PASSES`: mask Fisher, full Fisher, RegMean's Grams), and
   its record type writes the file.

:func:`calibrate`, :func:`calibrate_full` and :func:`calibrate_gram` run all three for one statistic each, through
one body (:func:`measure_statistics`); ``calibrate(..., gram_out=...)`` measures the mask Fisher and RegMean's Grams in
one pass (:data:`JOINT_PASSES`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Sequence, Union

from ..architectures import ArchitectureSpec, NodeShape, get_architecture
from ..checkpoints import has_tokenizer, load_config, model_fingerprint, resolve_model_dir
from ..errors import ModelLoadError, SettingsError, option, subject
from ..files import FullFisher, GramStats, MaskFisher, Measured
from ..outputs import check_scratch_folder, claim_output, private_folder
from ..paths import PathLike, user_path
from ..settings import CalibrationSettings, check_estimator, make_settings
from ..tasks import Task, task_of
from .data import CalibrationDataset, encode_labels, prepare_tokenizer, select_examples
from .engine import CalibrationPass, PreparedCalibration
from .full_pass import PASS as FULL_PASS
from .gram_pass import PASS as GRAM_PASS
from .mask_pass import PASS as MASK_PASS
from .mask_pass import measure_with_grams
from .placement import accelerator_type, check_device_map, load_model

LOG = logging.getLogger(__name__)

SettingsLike = Union[CalibrationSettings, Mapping[str, Any], None]
# Tasks whose data carries labels (language models predict their own text; QA data always holds answers).
_LABELLED = (Task.CLASSIFICATION, Task.REGRESSION, Task.TOKEN_CLASSIFICATION)
# The statistic each file format holds, and the pass that measures it.
PASSES: Dict[type, CalibrationPass] = {MaskFisher: MASK_PASS, FullFisher: FULL_PASS, GramStats: GRAM_PASS}
# Statistics that one pass measures together: ``measure(run, progress=...) -> ({record: fields}, N)``.
JOINT_PASSES: Dict[FrozenSet[type], Callable] = {frozenset({MaskFisher, GramStats}): measure_with_grams}


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


def _check_max_length(max_length: int, tokenizer, task: Task, pairs: bool, where: str) -> None:
    """Refuse a ``max_length`` the tokenizer cannot honour: it would add its special tokens anyway (and ignore the
    truncation), leaving nothing of the text, or no next token to predict."""
    minimum = tokenizer.num_special_tokens_to_add(pair=pairs) + 1
    if task == Task.CAUSAL_LM:
        minimum = max(minimum, 2)  # one token to predict from another
    if max_length < minimum:
        raise SettingsError(
            f"{where}: {option('max_length')} {max_length} leaves no room for text: the tokenizer adds "
            f"{minimum - 1} special token(s) to each example, and a {task.value} example needs at least {minimum} "
            f"tokens. Use {option('max_length')} {minimum} or more."
        )


def _check_columns_apply(settings: CalibrationSettings, task: Task, where: str) -> None:
    """Columns that the model's task never reads are refused rather than silently ignored."""
    if settings.label_column and task not in _LABELLED:
        raise SettingsError(
            f"{where}: {option('label_column')} names the labels of a classifier or token classifier; this is a "
            f"{task.value} model, whose loss takes no label column. Drop {option('label_column')}."
        )
    if settings.label_column and not settings.estimator.uses_labels:
        LOG.warning("%s: the %s estimator draws its own labels; %s %s is not read.", where, settings.estimator.value,
                    option("label_column"), settings.label_column)
    if settings.target_column and task != Task.SEQ2SEQ:
        raise SettingsError(
            f"{where}: {option('target_column')} names a sequence-to-sequence model's targets; this is a "
            f"{task.value} model. Drop {option('target_column')}."
        )


def _settings(settings: SettingsLike) -> CalibrationSettings:
    if settings is None:
        return CalibrationSettings()
    return settings if isinstance(settings, CalibrationSettings) else make_settings(settings)


@dataclass(frozen=True)
class CalibrationPlan:
    """Everything a calibration needs that can be checked without loading weights: the model's folder and config,
    its task, the settings, and the tokenized data."""

    model_dir: Path
    config: Any
    task: Task
    settings: CalibrationSettings
    dataset: CalibrationDataset
    description: Dict[str, Any]


def plan_calibration(
    model: PathLike, data: str, settings: SettingsLike = None, *, uses_loss: bool = True
) -> CalibrationPlan:
    """Resolve the model, check the settings against its task, and select and tokenize the data; no weight is
    loaded, so every mistake in the data or settings surfaces before any work. ``uses_loss=False`` plans a
    forward-only statistic (RegMean's Grams): no estimator, and no labels needed."""
    from transformers import AutoTokenizer

    settings = _settings(settings)
    model_dir = resolve_model_dir(model)
    config = load_config(model_dir)
    where = str(model_dir)
    spec = get_architecture(config.model_type, where=where)
    task = task_of(config, where=where)
    if uses_loss:
        check_estimator(settings.estimator, task)
        _check_columns_apply(settings, task, where)
    if settings.device_map:
        check_device_map(settings)
    examples = select_examples(
        data,
        samples=settings.samples,
        seed=settings.seed,
        task=task,
        text_columns=settings.text_columns,
        label_column=settings.label_column,
        target_column=settings.target_column,
        needs_labels=uses_loss and task in _LABELLED and settings.estimator.uses_labels,
    )
    labels = encode_labels(examples, config, source=data) if examples.labels is not None else None
    max_length = effective_max_length(settings.max_length, spec, config, where)
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
    _check_max_length(max_length, tokenizer, task, len(examples.description["text_columns"]) == 2, where)
    if examples.shortfall:  # said only now that the settings are known to be usable
        LOG.warning("%s", examples.shortfall)
    dataset = CalibrationDataset(examples, tokenizer, max_length=max_length, labels=labels, source=data)
    if task == Task.CAUSAL_LM:
        dataset.keep_scorable(source=data)
    description = {**examples.description, "max_length": max_length, "settings": settings.model_dump(mode="json")}
    return CalibrationPlan(model_dir, config, task, settings, dataset, description)


def load_calibration(plan: CalibrationPlan, accelerator=None, **model_options) -> PreparedCalibration:
    """Load the planned model as its settings place it and shard its data over processes. Use the result as a
    context manager (it removes this run's own offload folder)."""
    from torch.utils.data import DataLoader

    accelerator = accelerator or make_accelerator()
    settings = plan.settings
    resources = contextlib.ExitStack()
    try:
        net = _load_placed(plan.model_dir, plan.config, settings, accelerator, resources, **model_options)
    except BaseException:
        resources.close()
        raise
    loader = DataLoader(plan.dataset, batch_size=settings.batch_size, shuffle=False, collate_fn=plan.dataset.collate)
    # A device-mapped model takes its batches on its input device (the pass moves them), not on accelerator.device.
    loader = accelerator.prepare_data_loader(loader, device_placement=not settings.device_map)
    description = {**plan.description, "processes": accelerator.num_processes}
    return PreparedCalibration(plan.model_dir, net, loader, description, accelerator, settings, plan.task, resources)


@contextlib.contextmanager
def placed_model(model: PathLike, settings: SettingsLike = None, accelerator=None, **model_options):
    """Load ``model`` (folder or Hub id) with the head its config names, as the settings place it (dtype, device map,
    CPU and disk offload), for passes over your own batches; this run's own offload folder is removed on exit."""
    settings = _settings(settings)
    accelerator = accelerator or make_accelerator()
    model_dir = resolve_model_dir(model)
    config = load_config(model_dir)
    with contextlib.ExitStack() as resources:
        yield _load_placed(model_dir, config, settings, accelerator, resources, **model_options)


def _load_placed(model_dir: Path, config, settings: CalibrationSettings, accelerator,
                 resources: contextlib.ExitStack, **model_options):
    """The model as the settings place it; a disk-offload folder this run makes is removed when ``resources``
    closes."""
    offload = None
    if settings.offload_folder:
        check_scratch_folder(settings.offload_folder, inputs={"the model folder": model_dir}, name="offload_folder")
        offload = resources.enter_context(private_folder(Path(settings.offload_folder)))
    return load_model(model_dir, config, settings, accelerator, offload_folder=offload, **model_options)


def prepare_calibration(
    model: PathLike, data: str, settings: SettingsLike = None, accelerator=None, *, attn_implementation=None
) -> PreparedCalibration:
    """Plan and load a calibration (:func:`plan_calibration`, then :func:`load_calibration`), for custom passes; use
    the result as a context manager, or call ``cleanup()`` when done."""
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return load_calibration(plan_calibration(model, data, settings), accelerator, **options)


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


def _provenance(run: PreparedCalibration, model, count: int, statistic: CalibrationPass) -> Dict[str, Any]:
    """What every statistic file records about where it came from."""
    return {
        "shape": NodeShape.from_config(run.model.config),
        "fingerprint": model_fingerprint(run.model_dir),
        "model": str(model),
        "samples": count,
        "estimator": run.settings.estimator.value if statistic.uses_loss else "forward",
        "loss": run.task.loss.value if statistic.uses_loss else "",
        "dtype": str(run.model.dtype).removeprefix("torch."),
        "data": run.description,
    }


def check_settings_apply(settings: CalibrationSettings, record: Union[type, Sequence[type]], *, where: str = "",
                         remedy: str = "measure that instead") -> None:
    """Refuse pass-specific settings (say ``gram_inputs``) given for a statistic (or statistics measured together)
    whose pass does not read them; ``where`` (e.g. a recipe's model) starts the message, ``remedy`` ends it."""
    records = (record,) if isinstance(record, type) else tuple(record)
    unread = settings.unread_settings(set().union(*(PASSES[r].settings_read for r in records)))
    if unread:
        names = ", ".join(option(name) for name in unread)
        readers = sorted({PASSES[other].description for name in unread for other in PASSES
                          if name in PASSES[other].settings_read})
        one = len(unread) == 1
        measured = " and the ".join(PASSES[r].description for r in records)
        raise SettingsError(f"{where + ': ' if where else ''}{names} {'does' if one else 'do'} not apply to the "
                            f"{measured} this run measures; {'it is' if one else 'they are'} read "
                            f"only when measuring the {' or the '.join(readers)}. Remove {'it' if one else 'them'}, "
                            f"or {remedy}.")


def measure_statistic(
    record: type,
    model: PathLike,
    data: str,
    out: PathLike,
    settings: SettingsLike = None,
    *,
    overwrite: bool = False,
    accelerator=None,
    progress: bool = True,
    plan: Optional[CalibrationPlan] = None,
    out_name: str = "out",
) -> Measured:
    """Measure the statistic that ``record`` (a file format of :data:`PASSES`) holds and write it to ``out``.

    ``out`` may replace an existing file of that format only with ``overwrite``; anything else there, a path inside
    the model's folder, a folder that cannot take the file or a disk without room for it is refused before any
    work. ``plan`` reuses an earlier :func:`plan_calibration`; ``out_name`` is how messages name ``out``. Runs under
    any ``accelerate launch`` configuration; only the main process writes.
    """
    return measure_statistics({record: out}, model, data, settings, overwrite=overwrite, accelerator=accelerator,
                              progress=progress, plan=plan, out_names={record: out_name})[record]


def measure_statistics(
    outputs: Mapping[type, PathLike],
    model: PathLike,
    data: str,
    settings: SettingsLike = None,
    *,
    overwrite: bool = False,
    accelerator=None,
    progress: bool = True,
    plan: Optional[CalibrationPlan] = None,
    out_names: Optional[Mapping[type, str]] = None,
) -> Dict[type, Measured]:
    """Measure the statistics of ``outputs`` (``{file format: path}``: one of :data:`PASSES`, or a set that
    :data:`JOINT_PASSES` measures in one pass) and write each to its path; return them by format.

    Every output gets :func:`measure_statistic`'s checks before any work, and no output may equal or contain
    another. ``out_names`` says how messages name each path (default ``out``).
    """
    records = tuple(outputs)
    measure = PASSES[records[0]].measure if len(records) == 1 else JOINT_PASSES.get(frozenset(records))
    if measure is None:
        raise SettingsError(f"{' and '.join(PASSES[r].description for r in records)} are not measured in one pass; "
                            "run a calibration for each.")
    names = {record: (out_names or {}).get(record, "out") for record in records}
    settings = _settings(settings)
    check_settings_apply(settings, records)
    paths = {record: user_path(path) for record, path in outputs.items()}
    with _library_progress(progress):
        model_dir = resolve_model_dir(model)  # the one download of a Hub id
        config = load_config(model_dir)
        for record in records:
            PASSES[record].check(config, settings)
        inputs = {"the model folder": model_dir}
        claims = {}
        for record in records:
            others = {f"the {subject(names[r])}": paths[r] for r in records if r is not record}
            claims[record] = claim_output(paths[record], record.OUTPUT, overwrite=overwrite,
                                          inputs={**inputs, **others}, name=names[record],
                                          needed_bytes=PASSES[record].output_bytes(model_dir, config, settings))
        if settings.offload_folder:
            written = {f"the {subject(names[r])}": paths[r] for r in records}
            check_scratch_folder(settings.offload_folder, inputs={**inputs, **written}, name="offload_folder")
        uses_loss = any(PASSES[record].uses_loss for record in records)
        plan = plan or plan_calibration(model_dir, data, settings, uses_loss=uses_loss)
        model_options = {key: value for record in records for key, value in PASSES[record].model_options.items()}
        with load_calibration(plan, accelerator, **model_options) as run:
            fields, count = measure(run, progress=progress)
            if len(records) == 1:
                fields = {records[0]: fields}
            results = {record: record(**fields[record], **_provenance(run, model, count, PASSES[record]))
                       for record in records}
        if run.accelerator.is_main_process:
            for record in records:
                results[record].save(paths[record], claims[record])
        run.accelerator.wait_for_everyone()
    return results


def _calibrate_into(record: type, name: str, doc: str):
    """One public function per statistic, each :func:`measure_statistic` for its record type."""

    def run(
        model: PathLike,
        data: str,
        out: PathLike,
        settings: SettingsLike = None,
        *,
        overwrite: bool = False,
        accelerator=None,
        progress: bool = True,
    ):
        return measure_statistic(record, model, data, out, settings, overwrite=overwrite, accelerator=accelerator,
                                 progress=progress)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = doc + " The rules for ``out`` and processes are :func:`measure_statistic`'s."
    return run


def calibrate(
    model: PathLike,
    data: str,
    out: PathLike,
    settings: SettingsLike = None,
    *,
    overwrite: bool = False,
    accelerator=None,
    progress: bool = True,
    gram_out: Optional[PathLike] = None,
) -> MaskFisher:
    """Measure the mask Fisher of ``model`` (folder or Hub id) on ``data``, write it to the file ``out`` and return
    the :class:`MaskFisher`. With ``gram_out``, the same pass also measures RegMean's Gram matrices (the settings'
    ``gram_inputs``) of the same examples and writes them as a sharded folder there, which saves the Gram pass's
    forwards (read them with :meth:`GramStats.read`). The rules for ``out`` and processes are
    :func:`measure_statistic`'s; ``gram_out`` gets the same checks."""
    outputs = {MaskFisher: out, **({GramStats: gram_out} if gram_out is not None else {})}
    return measure_statistics(outputs, model, data, settings, overwrite=overwrite, accelerator=accelerator,
                              progress=progress, out_names={MaskFisher: "out", GramStats: "gram_out"})[MaskFisher]


calibrate_full = _calibrate_into(FullFisher, "calibrate_full", "Measure the full diagonal Fisher of every parameter "
                                 "and write it as a sharded folder ``out`` (the settings' ``chunk_size`` examples' "
                                 "gradients are held at once); return the :class:`FullFisher`.")
calibrate_gram = _calibrate_into(GramStats, "calibrate_gram", "Measure RegMean's Gram matrix of every linear layer "
                                 "input (the settings' ``gram_inputs``) on ``data``'s real tokens and write them as "
                                 "a sharded folder ``out``; return the :class:`GramStats`.")
