"""Calibration settings: one pydantic model validates every field once.

The ``calibrate`` command's options (:func:`calibration_options`) and a recipe's ``calibration:`` block are both
generated from :class:`CalibrationSettings`, so each default and each rule is written here and nowhere else.
"""

from __future__ import annotations

import enum
import functools
import json
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union, get_args, get_origin

import click
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from typing_extensions import Annotated

from .architectures import GRAM_INPUTS
from .errors import SettingsError, option
from .paths import user_path
from .tasks import Task


class Estimator(str, enum.Enum):
    """How the Fisher is estimated (``F`` is averaged over the N calibration examples unless noted)."""

    EMPIRICAL = "empirical"  # (1/N) sum_n (dL_n/dm)^2 with the data's labels, exact per example
    EXPECTED = "expected"  # (1/N) sum_n sum_y p(y|x_n) (d log p(y|x_n)/dm)^2; classifiers only
    SAMPLED = "sampled"  # as empirical, with labels drawn from the model's own predictive distribution
    BATCH = "batch"  # sum_b (d mean_{n in b} L_n / dm)^2: the authors' per-batch variant, about 1/B^2 of the rest

    @property
    def uses_labels(self) -> bool:
        return self in (Estimator.EMPIRICAL, Estimator.BATCH)

    @property
    def per_batch(self) -> bool:
        """Squares each batch's gradient of the mean loss and sums over batches (so the result depends on the
        batch size and is not averaged over examples); every other estimator squares per example and averages."""
        return self == Estimator.BATCH


# Which estimators each task's loss supports, and why the others are refused (the message names the alternatives).
ESTIMATORS: Dict[Task, Tuple[Estimator, ...]] = {
    Task.CLASSIFICATION: (Estimator.EMPIRICAL, Estimator.EXPECTED, Estimator.SAMPLED, Estimator.BATCH),
    Task.REGRESSION: (Estimator.EMPIRICAL, Estimator.BATCH),
    Task.CAUSAL_LM: (Estimator.EMPIRICAL, Estimator.SAMPLED, Estimator.BATCH),
    Task.TOKEN_CLASSIFICATION: (Estimator.EMPIRICAL, Estimator.SAMPLED, Estimator.BATCH),
    Task.QUESTION_ANSWERING: (Estimator.EMPIRICAL, Estimator.BATCH),
    Task.SEQ2SEQ: (Estimator.EMPIRICAL, Estimator.SAMPLED, Estimator.BATCH),
}
_REFUSED_BECAUSE = {
    (Estimator.EXPECTED, Task.REGRESSION): "a regressor (num_labels=1) has no distribution over labels to sum over",
    (Estimator.SAMPLED, Task.REGRESSION): "a regressor (num_labels=1) has no distribution over labels to draw from",
    (Estimator.EXPECTED, Task.QUESTION_ANSWERING): "it would sum over every start and end position",
    (Estimator.SAMPLED, Task.QUESTION_ANSWERING): "drawing start and end positions is not implemented",
    (Estimator.EXPECTED, Task.TOKEN_CLASSIFICATION): "it needs one backward pass per token and label; sampled "
    "estimates the same Fisher without bias",
    (Estimator.EXPECTED, Task.CAUSAL_LM): "it sums over the whole vocabulary at every position; sampled estimates "
    "the same Fisher without bias",
    (Estimator.EXPECTED, Task.SEQ2SEQ): "it sums over the whole vocabulary at every position; sampled estimates "
    "the same Fisher without bias",
}


def check_estimator(estimator: "Estimator", task: Task) -> None:
    """Refuse an estimator that has no meaning for the model's task, before any work."""
    estimator = Estimator(estimator)
    supported = ESTIMATORS[task]
    if estimator not in supported:
        why = _REFUSED_BECAUSE.get((estimator, task), "it is not implemented for this task")
        raise SettingsError(
            f"The {estimator.value} estimator does not apply to a {task.value} model: {why}. Use "
            + " or ".join(f"{option('estimator')} {e.value}" for e in supported) + "."
        )


class Aggregate(str, enum.Enum):
    """How per-example squared gradients are combined into the Fisher."""

    MEAN = "mean"  # (1/N) sum_n g_n^2: the Fisher
    NORMALIZED = "normalized"  # (1/N) sum_n g_n^2 / sum(g_n^2): every example weighs the same, outliers cannot dominate


class MixedPrecision(str, enum.Enum):
    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


class LoadDtype(str, enum.Enum):
    """The dtype the model's weights are loaded in; Fisher sums are float32/float64 whatever this is."""

    AUTO = "auto"  # the checkpoint's own dtype on a GPU, float32 on a CPU
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    def resolve(self, config, *, on_gpu: bool) -> str:
        """The concrete dtype name for a model with HF ``config``, loaded on a GPU or not."""
        if self != LoadDtype.AUTO:
            return self.value
        if not on_gpu:
            return "float32"
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        name = str(stored).removeprefix("torch.") if stored is not None else "float32"
        return name if name in {d.value for d in LoadDtype} else "float32"


class GramDtype(str, enum.Enum):
    """How RegMean's Gram matrices are stored (they are summed in float32 whatever this is)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

Positive = Annotated[StrictInt, Field(gt=0)]
# Fields marked like this only decide where and in what pieces the work runs; the result does not depend on them
# beyond float round-off, so they are left out of the calibration cache key.
_PLACEMENT = {"placement": True}
# Fields marked like this are read by some statistics' passes only (each pass lists them in ``reads``): a value other
# than the default for a statistic whose pass does not read it is a mistake, refused before any work.
_PASS_SPECIFIC = {"pass_specific": True}


class CalibrationSettings(BaseModel):
    """Everything that determines a calibration besides the model and the data source."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    samples: Positive = Field(256, description="Number of calibration examples.")
    batch_size: Positive = Field(16, description="Examples per forward/backward pass (per process).")
    max_length: Positive = Field(
        256, description="Truncate examples to this many tokens (capped at the model's position limit)."
    )
    estimator: Estimator = Field(
        Estimator.EMPIRICAL, description="How the Fisher is estimated.", json_schema_extra=_PASS_SPECIFIC
    )
    aggregate: Aggregate = Field(
        Aggregate.MEAN,
        description="mean: the Fisher; normalized: each example's squared gradients scaled to sum 1 first (robust to "
        "a few badly fitted examples; empirical and sampled estimators).",
        json_schema_extra=_PASS_SPECIFIC,
    )
    seed: Annotated[StrictInt, Field(ge=0)] = Field(0, description="Seed for shuffling the data and for sampled labels.")
    text_columns: Optional[Tuple[str, ...]] = Field(
        None,
        validation_alias=AliasChoices("text_columns", "text_column"),
        description="Text column; give twice for sentence pairs [default: guessed].",
        json_schema_extra={"cli": "--text-column"},
    )
    label_column: Optional[str] = Field(
        None, description="Label column for classifiers [default: label; ner_tags, labels or tags for token tags].",
        json_schema_extra=_PASS_SPECIFIC,
    )
    target_column: Optional[str] = Field(
        None, description="Sequence-to-sequence models: the target text column [default: target, summary, ...].",
        json_schema_extra=_PASS_SPECIFIC,
    )
    mixed_precision: MixedPrecision = Field(MixedPrecision.NO, description="Autocast the forward pass.")
    dtype: LoadDtype = Field(
        LoadDtype.AUTO, description="Load the weights in this dtype (auto: the checkpoint's on a GPU, float32 on a CPU)."
    )
    micro_batch_size: Optional[Positive] = Field(
        None,
        description="Examples per backward pass [default: automatic, from the memory that is free]; same result.",
        json_schema_extra=_PLACEMENT,
    )
    chunk_size: Positive = Field(
        8,
        description="Full Fisher only: examples whose per-example gradients are held at once (memory ~ chunk x model).",
        json_schema_extra={**_PLACEMENT, **_PASS_SPECIFIC},
    )
    device_map: Optional[str] = Field(
        None,
        description="Spread the model over devices: auto, balanced, balanced_low_0, sequential, or a JSON file "
        "mapping module names to devices (as transformers' from_pretrained).",
        json_schema_extra=_PLACEMENT,
    )
    max_memory: Optional[Dict[Union[int, str], str]] = Field(
        None,
        description="With --device-map: memory per device, comma-separated device=size, e.g. 0=70GiB,cpu=100GiB.",
        json_schema_extra=_PLACEMENT,
    )
    offload_folder: Optional[str] = Field(
        None, description="With --device-map: folder for weights offloaded to disk.", json_schema_extra=_PLACEMENT
    )
    gram_inputs: Optional[Tuple[str, ...]] = Field(
        None,
        description="RegMean (--gram) only: the inputs that get a Gram matrix, among attn_in, attn_out, ffn_in, "
        "ffn_out (give once per input) [default: every input the family has].",
        json_schema_extra=_PASS_SPECIFIC,
    )
    gram_dtype: GramDtype = Field(
        GramDtype.FLOAT32,
        description="RegMean (--gram) only: storage dtype of the Gram matrices (summed in float32).",
        json_schema_extra=_PASS_SPECIFIC,
    )

    @field_validator("gram_inputs", mode="before")
    @classmethod
    def _known_gram_inputs(cls, value):
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        unknown = [site for site in value or () if site not in GRAM_INPUTS]
        if unknown:
            raise ValueError(f"unknown input(s) {', '.join(unknown)}; choose among {', '.join(GRAM_INPUTS)}")
        return tuple(dict.fromkeys(value)) if value is not None else None

    @field_validator("text_columns", mode="before")
    @classmethod
    def _one_or_two_columns(cls, value):
        if isinstance(value, str):
            value = (value,)
        if value is not None and not 1 <= len(value) <= 2:
            raise ValueError("give one text column, or two for sentence pairs")
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _parse_max_memory(cls, value):
        return None if value is None else parse_max_memory(value)

    @field_validator("device_map")
    @classmethod
    def _known_device_map(cls, value):
        if value is None or value in DEVICE_MAP_STRATEGIES:
            return value
        if not value.endswith(".json"):
            raise ValueError(f"expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a .json file")
        path = user_path(value)
        if not path.is_file():
            raise ValueError(f"device-map file {path} does not exist")
        return str(path)

    @field_validator("offload_folder")
    @classmethod
    def _resolved_folder(cls, value):
        return None if value is None else str(user_path(value))

    @model_validator(mode="after")
    def _aggregate_needs_per_example_gradients(self):
        if self.aggregate == Aggregate.NORMALIZED and self.estimator not in (Estimator.EMPIRICAL, Estimator.SAMPLED):
            raise ValueError("aggregate normalized needs per-example gradients: use estimator empirical or sampled")
        return self

    @model_validator(mode="after")
    def _placement_needs_device_map(self):
        if (self.max_memory or self.offload_folder) and not self.device_map:
            given = " and ".join(option(name) for name in ("max_memory", "offload_folder") if getattr(self, name))
            verb = "place" if " and " in given else "places"
            raise ValueError(f"{given} {verb} a device-mapped model; set {option('device_map')} too (e.g. auto)")
        return self

    def device_map_value(self) -> Union[None, str, Dict[str, Any]]:
        """``device_map`` as transformers takes it: a strategy name, or the mapping read from the JSON file."""
        if self.device_map is None or self.device_map in DEVICE_MAP_STRATEGIES:
            return self.device_map
        try:
            with open(self.device_map, encoding="utf-8") as handle:
                mapping = json.load(handle)
        except (OSError, ValueError) as error:
            raise SettingsError(f"device_map file {self.device_map} cannot be read as JSON ({error}).") from error
        if not isinstance(mapping, dict):
            raise SettingsError(f"device_map file {self.device_map} must hold a mapping of module names to devices.")
        return mapping

    def unread_settings(self, reads: Iterable[str]) -> List[str]:
        """The pass-specific settings given a value other than their default that a pass reading only ``reads``
        would ignore."""
        reads = set(reads)
        return [name for name, field in type(self).model_fields.items()
                if (field.json_schema_extra or {}).get("pass_specific") and name not in reads
                and getattr(self, name) != field.default]

    def result_fields(self) -> Dict[str, Any]:
        """The settings a calibration's result depends on (placement left out; batch size only for ``batch``)."""
        values = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            if (field.json_schema_extra or {}).get("placement"):
                values.pop(name)
        if not self.estimator.per_batch:
            values.pop("batch_size")
        return values


def parse_max_memory(value: Union[str, Mapping]) -> Dict[Union[int, str], str]:
    """``"0=70GiB,cpu=100GiB"`` or a mapping -> ``{0: "70GiB", "cpu": "100GiB"}`` (accelerate's format)."""
    from accelerate.utils import convert_file_size_to_int

    if isinstance(value, str):
        pairs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            device, sep, size = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r} is not device=size (e.g. 0=70GiB or cpu=100GiB)")
            pairs.append((device.strip(), size.strip()))
    elif isinstance(value, Mapping):
        pairs = [(str(device), str(size)) for device, size in value.items()]
    else:
        raise ValueError("expected device=size pairs, e.g. 0=70GiB,cpu=100GiB")
    parsed: Dict[Union[int, str], str] = {}
    for device, size in pairs:
        key: Union[int, str] = int(device) if device.isdigit() else device
        if isinstance(key, str) and key not in ("cpu", "disk", "mps") and not key.startswith(("cuda:", "xpu:", "npu:")):
            raise ValueError(f"unknown device {device!r}: use a GPU index (0, 1, ...), cpu or disk")
        try:
            convert_file_size_to_int(size)
        except ValueError:
            raise ValueError(f"size {size!r} for device {device!r} is not a size like 70GiB or 500MB") from None
        parsed[key] = size
    if not parsed:
        raise ValueError("no device=size pair given")
    return parsed


def explain(error: ValidationError, where: str) -> str:
    """One readable sentence per problem of a pydantic error, naming the key and the value given."""
    fields = CalibrationSettings.model_fields
    unknown = [str(e["loc"][-1]) for e in error.errors() if e["type"] == "extra_forbidden"]
    problems = []
    if unknown:
        allowed = sorted(fields) + ["text_column"]
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}. Allowed: {', '.join(allowed)}")
    for item in error.errors():
        if item["type"] == "extra_forbidden":
            continue
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a rule about several fields
            problems.append(message)
            continue
        key = ".".join(str(part) for part in item["loc"] if not isinstance(part, int))
        problems.append(f"{key}: {message}, got {item['input']!r}")
    return f"{where}: " + "; ".join(problems) + "."


def make_settings(values: Mapping[str, Any], where: str = "calibration settings") -> CalibrationSettings:
    """Validate ``values`` (a recipe block, CLI options, keyword arguments) into settings, or raise SettingsError."""
    try:
        return CalibrationSettings.model_validate(dict(values))
    except ValidationError as error:
        raise SettingsError(explain(error, where)) from None


def _click_type(annotation) -> Any:
    """The click parameter type for a settings field's annotation (Optional and Annotated unwrapped)."""
    while get_origin(annotation) in (Annotated, Union):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return click.Choice([member.value for member in annotation])
    return int if annotation is int else str  # mappings and column tuples arrive as text


def _is_tuple(annotation) -> bool:
    """Whether a settings field holds several values (given once each on the command line)."""
    while get_origin(annotation) in (Annotated, Union):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return get_origin(annotation) is tuple


def calibration_options(function: Callable) -> Callable:
    """Add one ``--option`` per :class:`CalibrationSettings` field to a click command, with its default and help.

    The command receives the values as a ``settings`` keyword argument, validated into a CalibrationSettings.
    """
    names = list(CalibrationSettings.model_fields)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in names}
        given = {name: value for name, value in given.items() if value not in (None, ())}
        return function(*args, settings=make_settings(given, "options"), **kwargs)

    for name in reversed(names):
        field = CalibrationSettings.model_fields[name]
        extra = field.json_schema_extra or {}
        flag = extra.get("cli", "--" + name.replace("_", "-"))
        default = field.default.value if isinstance(field.default, enum.Enum) else field.default
        multiple = _is_tuple(field.annotation)
        wrapper = click.option(
            flag,
            name,
            type=_click_type(field.annotation),
            default=None if multiple else default,
            multiple=multiple,
            show_default=default is not None and not multiple,
            help=field.description,
        )(wrapper)
    return wrapper
