"""Calibration data: load a local file or a ``datasets`` name, pick the columns, tokenize, pad right.

Three kinds of example:

* **text**: one text column, or two for sentence pairs (classifiers), or plain text for language models;
* **chat**: a ``messages`` column of ``{role, content}`` turns, rendered with the tokenizer's chat template exactly
  as a chat model is fine-tuned; the loss is taken on the assistant turns only;
* **completion**: ``prompt`` and ``completion`` columns (strings, or lists of chat turns); the loss is taken on the
  completion only.

Every problem with a file or a value is one :class:`CalibrationDataError` naming the file, the row and the fix.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import CalibrationDataError

LOG = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"), ("text_a", "text_b"))
_LABEL_COLUMNS = ("label", "labels")
_ROW = "__row__"  # original row number, carried through the shuffle for error messages

TEXT, CHAT, COMPLETION = "text", "chat", "completion"


@dataclass(frozen=True)
class CalibrationData:
    """Selected examples, each a tuple of fields of one kind, optional raw labels, and a description for metadata.

    ``kind`` is ``text`` (fields: one or two strings), ``chat`` (fields: one list of turns) or ``completion``
    (fields: prompt, completion). ``rows`` are the examples' row numbers in the source, for error messages.
    """

    kind: str
    examples: List[Tuple[Any, ...]]
    labels: Optional[List[Any]]
    rows: List[int]
    description: Dict


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs its own parse errors at error level; ours say the same in one line, so silence it meanwhile."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _check_text(path: str) -> None:
    """Refuse a text file that is not UTF-8 (naming the line and the byte) or holds only whitespace."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, blank = 1, True
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                # error.object is the decoder's few pending bytes followed by this chunk
                position = max(0, error.start - (len(error.object) - len(chunk)))
                line += chunk[:position].count(b"\n")
                raise CalibrationDataError(
                    f"Calibration data {path} is not UTF-8 text: byte 0x{error.object[error.start]:02x} on line {line}. "
                    "Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
            if not chunk:
                break
            line += chunk.count(b"\n")
            blank = blank and not chunk.strip()
    if blank:
        raise CalibrationDataError(f"Calibration data {path} holds no rows (only whitespace).")


def _first_bad_json_line(path: str) -> Optional[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as error:
                    return f"line {number} is not valid JSON ({error})"
    return None


def _load_file(source: str):
    import datasets

    suffix = os.path.splitext(source)[1].lower()
    if suffix not in _BUILDERS:
        raise CalibrationDataError(
            f"Calibration data {source}: unsupported file type {suffix!r}; use one of {', '.join(_BUILDERS)}."
        )
    if os.path.getsize(source) == 0:
        raise CalibrationDataError(f"Calibration data {source} is empty (0 bytes).")
    if suffix == ".parquet":
        with open(source, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            if head != b"PAR1" or handle.read(4) != b"PAR1":
                raise CalibrationDataError(
                    f"Calibration data {source} is not a Parquet file (no PAR1 magic bytes); is it text with the wrong "
                    "extension?"
                )
    else:
        _check_text(source)
    # A .txt file yields one example per paragraph (blank-line separated), not per line.
    extra = {"sample_by": "paragraph"} if suffix == ".txt" else {}
    try:
        with _quiet_datasets():
            return datasets.load_dataset(_BUILDERS[suffix], data_files=source, split="train", **extra)
    except Exception as error:  # datasets wraps pyarrow/pandas parse errors in several types, or none (StopIteration)
        detail = _first_bad_json_line(source) if suffix in (".jsonl", ".json") else None
        cause = error.__cause__ or error
        detail = detail or (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if isinstance(error, StopIteration) or "SchemaInference" in type(cause).__name__:
            detail = "it holds no rows"
        raise CalibrationDataError(
            f"Calibration data {source} cannot be read as {_BUILDERS[suffix]}: {detail}."
        ) from error


def load_rows(source: str):
    """Load a local .jsonl/.json/.csv/.parquet/.txt file, or ``name[:config][@split]`` from ``datasets``."""
    import datasets

    if os.path.isdir(source):
        raise CalibrationDataError(f"Calibration data {source} is a folder; pass a data file or a datasets name.")
    if os.path.exists(source):
        return _load_file(source)
    suffix = os.path.splitext(source)[1].lower()
    if suffix in _BUILDERS or os.sep in source:
        raise CalibrationDataError(f"Calibration data file {source} does not exist.")
    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as error:  # datasets raises many types for "not found" / "offline"
        raise CalibrationDataError(
            f"Could not load calibration dataset {source!r} ({type(error).__name__}: {error}). "
            "Pass a local file, or a datasets name as name[:config][@split]."
        ) from error


def _pick_columns(columns: Sequence[str], requested: Optional[Sequence[str]], source: str, chat_ok: bool):
    """(kind, columns) for the data: the requested text columns, or guessed ones."""
    if requested:
        missing = [column for column in requested if column not in columns]
        if missing:
            raise CalibrationDataError(
                f"Calibration data {source} has no column {missing[0]!r} (columns: {', '.join(columns)}). "
                "Pass --text-column with one of those (twice for sentence pairs)."
            )
        return TEXT, list(requested)
    if chat_ok and "messages" in columns:
        return CHAT, ["messages"]
    if chat_ok and "prompt" in columns and "completion" in columns:
        return COMPLETION, ["prompt", "completion"]
    for pair in _PAIR_COLUMNS:
        if all(column in columns for column in pair):
            return TEXT, list(pair)
    for column in _TEXT_COLUMNS:
        if column in columns:
            return TEXT, [column]
    raise CalibrationDataError(
        f"Calibration data {source}: could not guess the text column among {', '.join(columns)}. "
        "Pass --text-column NAME (twice for sentence pairs)."
    )


def _usable(kind: str, fields: Tuple[Any, ...]) -> bool:
    if kind == TEXT:
        return all(isinstance(text, str) and text.strip() for text in fields)
    return all(isinstance(part, (str, list)) and len(part) > 0 for part in fields)


def select_examples(
    source: str,
    *,
    samples: int,
    seed: int,
    text_columns: Optional[Sequence[str]] = None,
    label_column: Optional[str] = None,
    needs_labels: bool = False,
    chat_ok: bool = False,
) -> CalibrationData:
    """Shuffle with ``seed``, drop empty examples and take the first ``samples``; warn if fewer exist.

    ``chat_ok`` (language models) lets ``messages`` and ``prompt``/``completion`` columns be recognised.
    """
    rows = load_rows(source)
    columns = [c for c in rows.column_names if c != _ROW]
    kind, text_cols = _pick_columns(columns, text_columns, source, chat_ok)
    if kind == TEXT and chat_ok and len(text_cols) == 1 and len(rows) and isinstance(rows[0][text_cols[0]], list):
        kind = CHAT  # --text-column named a column of chat turns
    label_col = None
    if needs_labels:
        label_col = label_column or next((c for c in _LABEL_COLUMNS if c in columns), None)
        if label_col is None or label_col not in columns:
            raise CalibrationDataError(
                f"Calibration data {source} has no label column {label_column or 'label'!r} "
                f"(columns: {', '.join(columns)}). Pass --label-column NAME, or use --estimator expected/sampled, "
                "which need no labels."
            )
    available = len(rows)
    rows = rows.add_column(_ROW, list(range(available))).shuffle(seed=seed)
    examples, labels, numbers = [], [], []
    for row in rows:
        fields = tuple(row[column] for column in text_cols)
        if not _usable(kind, fields):
            continue
        examples.append(fields)
        numbers.append(row[_ROW])
        if label_col is not None:
            labels.append(row[label_col])
        if len(examples) == samples:
            break
    if not examples:
        raise CalibrationDataError(f"Calibration data {source} has no non-empty examples in column(s) {text_cols}.")
    if len(examples) < samples:
        LOG.warning("Calibration data %s has only %d usable examples; %d were asked for.", source, len(examples), samples)
    description = {
        "source": source,
        "kind": kind,
        "text_columns": text_cols,
        "label_column": label_col,
        "rows_available": available,
    }
    return CalibrationData(kind, examples, labels if label_col else None, numbers, description)


def encode_labels(data: CalibrationData, config, *, source: str) -> torch.Tensor:
    """Class ids (names mapped through ``config.label2id``), or floats for a regressor (``num_labels == 1``).

    Missing, non-integer and out-of-range labels are refused, naming the row.
    """
    label2id = {str(key): value for key, value in (config.label2id or {}).items()}
    values = []
    for label, row in zip(data.labels, data.rows):
        where = f"Calibration data {source}, row {row + 1}"
        number = isinstance(label, (int, float)) and not isinstance(label, bool)
        if config.num_labels == 1:
            if not number or not math.isfinite(label):
                raise CalibrationDataError(f"{where}: label {label!r} is not a number; this model is a regressor.")
            values.append(float(label))
            continue
        if isinstance(label, str):
            if label not in label2id:
                raise CalibrationDataError(f"{where}: label {label!r} is not in the model's label2id {sorted(label2id)}.")
            label = label2id[label]
        elif not number or not float(label).is_integer():
            raise CalibrationDataError(
                f"{where}: label {label!r} is not a class id; a classifier with num_labels={config.num_labels} needs "
                f"integer labels 0..{config.num_labels - 1} or names from its label2id."
            )
        label = int(label)
        if not 0 <= label < config.num_labels:
            raise CalibrationDataError(
                f"{where}: label {label} is out of range for a model with num_labels={config.num_labels}."
            )
        values.append(label)
    return torch.tensor(values, dtype=torch.float32 if config.num_labels == 1 else torch.long)


def _chat_turns(messages: Any, where: str) -> List[Dict[str, str]]:
    if not isinstance(messages, list) or not all(
        isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
        for turn in messages
    ):
        raise CalibrationDataError(f"{where}: a conversation must be a list of {{role, content}} turns with text.")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def _render(tokenizer, turns: List[Dict[str, str]], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_spans(tokenizer, turns: List[Dict[str, str]], first_scored: int, where: str) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns from ``first_scored`` on.

    A turn's span runs from the end of the prompt that asks for it (the conversation so far plus the template's
    generation prompt) to the end of the turn as the template renders it: end-of-turn tokens are included, the
    template's trailing whitespace is not.
    """
    full = _render(tokenizer, turns)
    spans = []
    for index in range(first_scored, len(turns)):
        if turns[index]["role"] != "assistant":
            continue
        before = _render(tokenizer, turns[:index], generation_prompt=True)
        through = _render(tokenizer, turns[: index + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise CalibrationDataError(
                f"{where}: the tokenizer's chat template does not render the conversation's prefixes as prefixes of "
                "the whole (e.g. it rewrites earlier turns), so the assistant tokens cannot be located. Use "
                "prompt/completion columns, or plain text."
            )
        # The turn's trailing separator (e.g. the newline after <|im_end|>) is the template's, not the answer's.
        spans.append((len(before), len(before) + len(through[len(before):].rstrip())))
    if not spans:
        raise CalibrationDataError(f"{where}: the conversation has no assistant turn to take the loss on.")
    return full, spans


def _encode_spans(tokenizer, text: str, spans, max_length: int, *, special_tokens: bool) -> Dict[str, List[int]]:
    encoding = tokenizer(
        text, add_special_tokens=special_tokens, truncation=True, max_length=max_length, return_offsets_mapping=True
    )
    offsets = encoding.pop("offset_mapping")
    # A token is scored if its text starts inside a scored span (special tokens have empty offsets at 0).
    encoding["loss_mask"] = [
        int(end > start and any(a <= start < b for a, b in spans)) for start, end in offsets
    ]
    return dict(encoding)


class CalibrationDataset(torch.utils.data.Dataset):
    """Tokenized examples; ``collate`` pads on the right, which BERT's absolute positions require."""

    def __init__(self, data: CalibrationData, tokenizer, *, max_length: int, labels: Optional[torch.Tensor], source: str):
        self.tokenizer = tokenizer
        self.labels = labels
        self.encodings = [
            self._encode(data.kind, fields, max_length, f"Calibration data {source}, row {row + 1}")
            for fields, row in zip(data.examples, data.rows)
        ]

    def _encode(self, kind: str, fields, max_length: int, where: str) -> Dict[str, List[int]]:
        tokenizer = self.tokenizer
        if kind == TEXT:
            return dict(tokenizer(*fields, truncation=True, max_length=max_length, return_attention_mask=True))
        if kind == COMPLETION and all(isinstance(part, str) for part in fields):
            prompt, completion = fields
            spans = [(len(prompt), len(prompt) + len(completion))]
            return _encode_spans(tokenizer, prompt + completion, spans, max_length, special_tokens=True)
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationDataError(
                f"{where}: the data holds chat turns, but the tokenizer has no chat template. Use a chat model's "
                "tokenizer, or give the text as plain strings."
            )
        if kind == CHAT:
            turns, first_scored = _chat_turns(fields[0], where), 0
        else:
            prompt, completion = (_chat_turns(part, where) for part in fields)
            turns, first_scored = prompt + completion, len(prompt)
        text, spans = _chat_spans(tokenizer, turns, first_scored, where)
        return _encode_spans(tokenizer, text, spans, max_length, special_tokens=False)

    def keep_scorable(self, *, source: str) -> None:
        """Drop examples without a next-token target (one token, or no scored token after truncation); warn."""

        def scorable(encoding) -> bool:
            mask = encoding.get("loss_mask") or encoding["attention_mask"]
            return len(encoding["input_ids"]) >= 2 and any(mask[1:])

        keep = [i for i, encoding in enumerate(self.encodings) if scorable(encoding)]
        if not keep:
            raise CalibrationDataError(
                f"Calibration data {source}: no example has a token to take the loss on (each is a single token, or "
                "its completion/assistant part was cut off by --max-length)."
            )
        if len(keep) < len(self.encodings):
            LOG.warning(
                "Calibration data %s: dropped %d example(s) with no token to take the loss on (a single token, or a "
                "completion cut off by --max-length).",
                source, len(self.encodings) - len(keep),
            )
            self.encodings = [self.encodings[i] for i in keep]
            if self.labels is not None:
                self.labels = self.labels[keep]

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.encodings[index])
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item

    def collate(self, items: List[dict]) -> Dict[str, torch.Tensor]:
        features = [{k: v for k, v in item.items() if k not in ("labels", "loss_mask")} for item in items]
        batch = dict(self.tokenizer.pad(features, padding=True, return_tensors="pt"))
        if "loss_mask" in items[0]:
            length = batch["input_ids"].shape[1]
            batch["loss_mask"] = torch.tensor([m["loss_mask"] + [0] * (length - len(m["loss_mask"])) for m in items])
        if self.labels is not None:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        return batch


def prepare_tokenizer(tokenizer):
    """Right padding, and a pad token for decoder tokenizers that lack one (masked out via attention_mask)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
