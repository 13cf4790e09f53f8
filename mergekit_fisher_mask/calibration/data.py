"""Calibration data: load a local file or a ``datasets`` name, pick the columns, tokenize, pad right.

The kinds of example, chosen by the model's task:

* **text**: one text column, or two for sentence pairs (classifiers), or plain text for language models;
* **chat**: a ``messages`` column of ``{role, content}`` turns, rendered with the tokenizer's chat template exactly
  as a chat model is fine-tuned; the loss is taken on the assistant turns only;
* **completion**: ``prompt`` and ``completion`` columns (strings, or lists of chat turns); the loss is taken on the
  completion only;
* **tokens** (token classification): a word list and one tag per word, on the word's first sub-token;
* **qa** (extractive QA): ``question``, ``context`` and SQuAD-style ``answers``;
* **seq2seq**: a source and a target text column.

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
from ..paths import looks_local, user_path
from ..tasks import Task
from .losses import IGNORE, TARGETS

LOG = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"), ("text_a", "text_b"))
_LABEL_COLUMNS = ("label", "labels")
_ROW = "__row__"  # original row number, carried through the shuffle for error messages

TEXT, CHAT, COMPLETION, TOKENS, QA, SEQ2SEQ = "text", "chat", "completion", "tokens", "qa", "seq2seq"
_WORD_COLUMNS = ("tokens", "words")
_TAG_COLUMNS = ("ner_tags", "labels", "tags", "label")
_QA_COLUMNS = ("question", "context")
_SOURCE_COLUMNS = ("source", "input", "text", "document", "article", "question")
_TARGET_COLUMNS = ("target", "output", "summary", "highlights", "answer", "response")
# Keys the tokenizer pads itself; the rest are padded by the dataset's collate.
_PADDED_BY_TOKENIZER = frozenset({"input_ids", "attention_mask", "token_type_ids"})


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
    shortfall: str = ""  # the warning when fewer usable examples exist than were asked for


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
        if (isinstance(error, StopIteration) or "SchemaInference" in type(cause).__name__
                or "corresponds to no data" in str(cause)):
            detail = "it holds no rows"
        raise CalibrationDataError(
            f"Calibration data {source} cannot be read as {_BUILDERS[suffix]}: {detail}."
        ) from error


def load_rows(source: str):
    """Load a local .jsonl/.json/.csv/.parquet/.txt file, or ``name[:config][@split]`` from ``datasets``."""
    import datasets

    local = user_path(source)
    if local.is_dir():
        raise CalibrationDataError(f"Calibration data {source} is a folder; pass a data file or a datasets name.")
    if local.exists():
        return _load_file(str(local))
    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    # A Hub dataset is "name" or "org/name"; anything else that does not exist is a missing local file.
    if os.path.splitext(source)[1].lower() in _BUILDERS or looks_local(name):
        raise CalibrationDataError(
            f"Calibration data file {source} does not exist ({local}; data paths are resolved against the current "
            f"folder {os.getcwd()}, or a recipe's folder)."
        )
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as error:  # datasets raises many types for "not found" / "offline"
        raise CalibrationDataError(
            f"Could not load calibration dataset {source!r} ({type(error).__name__}: {error}). "
            "Pass a local file, or a datasets name as name[:config][@split]."
        ) from error


def _missing(columns: Sequence[str], wanted: Sequence[str], source: str, option: str) -> None:
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise CalibrationDataError(
            f"Calibration data {source} has no column {missing[0]!r} (columns: {', '.join(columns)}). "
            f"Pass {option} with one of those."
        )


def _guess(columns: Sequence[str], candidates: Sequence[str], source: str, what: str, option: str) -> str:
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise CalibrationDataError(
            f"Calibration data {source}: could not guess the {what} column among {', '.join(columns)}. "
            f"Pass {option} NAME."
        )
    return found


def _pick_columns(
    columns: Sequence[str], task: Task, source: str, text_columns: Optional[Sequence[str]], target_column: Optional[str]
) -> Tuple[str, List[str]]:
    """(kind, columns) of the data for a model with this task: requested or guessed."""
    if text_columns:
        _missing(columns, text_columns, source, "--text-column (twice for sentence pairs)")
    if task == Task.TOKEN_CLASSIFICATION:
        return TOKENS, list(text_columns or [_guess(columns, _WORD_COLUMNS, source, "word list", "--text-column")])
    if task == Task.QUESTION_ANSWERING:
        fields = list(text_columns or [c for c in _QA_COLUMNS[:2] if c in columns]) + ["answers"]
        _missing(columns, fields, source, "--text-column QUESTION --text-column CONTEXT (and an answers column)")
        return QA, fields
    if task == Task.SEQ2SEQ:
        source_column = (text_columns or [_guess(columns, _SOURCE_COLUMNS, source, "source text", "--text-column")])[0]
        if target_column:
            _missing(columns, [target_column], source, "--target-column")
        target = target_column or _guess(columns, _TARGET_COLUMNS, source, "target text", "--target-column")
        return SEQ2SEQ, [source_column, target]
    if text_columns:
        return TEXT, list(text_columns)
    if task == Task.CAUSAL_LM and "messages" in columns:
        return CHAT, ["messages"]
    if task == Task.CAUSAL_LM and "prompt" in columns and "completion" in columns:
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


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")


def _unusable(kind: str, fields: Tuple[Any, ...], columns: Sequence[str]) -> Optional[str]:
    """Why an example cannot be used (``None``: it can), e.g. ``"no value in 'text'"``."""
    checked = columns[:2] if kind == QA else columns
    for value, column in zip(fields, checked):
        if value is None:
            return f"no value in {column!r}"
        if kind in (TEXT, SEQ2SEQ, QA) and not isinstance(value, str):
            return f"{_kind_of(value)}, not text, in {column!r}"
        if isinstance(value, str) and not value.strip():
            return f"empty text in {column!r}"
        if kind == TOKENS and not (isinstance(value, list) and value):
            return f"no word list in {column!r}"
        if not isinstance(value, (str, list)) or len(value) == 0:
            return f"{_kind_of(value)}, not text or chat turns, in {column!r}"
    if kind == QA and not isinstance(fields[2], dict):
        return f"no answers mapping in {columns[2]!r}"
    return None


def _skipped(reasons: Dict[str, List[int]]) -> str:
    """``12 rows skipped: 8 with no value in 'text' (e.g. row 3), 4 with ...``."""
    total = sum(len(rows) for rows in reasons.values())
    parts = [f"{len(rows)} with {reason} (e.g. row {rows[0] + 1})" for reason, rows in
             sorted(reasons.items(), key=lambda item: -len(item[1]))]
    return f"{total} row(s) skipped: " + ", ".join(parts)


def select_examples(
    source: str,
    *,
    samples: int,
    seed: int,
    task: Task = Task.CLASSIFICATION,
    text_columns: Optional[Sequence[str]] = None,
    label_column: Optional[str] = None,
    target_column: Optional[str] = None,
    needs_labels: bool = False,
) -> CalibrationData:
    """Shuffle with ``seed``, drop empty examples and take the first ``samples``. If fewer exist, ``shortfall`` says
    so, for the caller to warn once its own checks have passed.

    The columns depend on the model's ``task``: text (or pairs) and a label for sequence classifiers; text, chat
    ``messages`` or ``prompt``/``completion`` for language models; a word list and per-word tags for token
    classifiers; question, context and answers for QA; source and target text for sequence-to-sequence models.
    """
    rows = load_rows(source)
    columns = [c for c in rows.column_names if c != _ROW]
    kind, text_cols = _pick_columns(columns, task, source, text_columns, target_column)
    if kind == TEXT and task == Task.CAUSAL_LM and len(text_cols) == 1 and len(rows) and isinstance(rows[0][text_cols[0]], list):
        kind = CHAT  # --text-column named a column of chat turns
    label_col = None
    if needs_labels:
        candidates = _TAG_COLUMNS if task == Task.TOKEN_CLASSIFICATION else _LABEL_COLUMNS
        label_col = label_column or next((c for c in candidates if c in columns), None)
        if label_col is None or label_col not in columns:
            raise CalibrationDataError(
                f"Calibration data {source} has no label column {label_column or candidates[0]!r} "
                f"(columns: {', '.join(columns)}). Pass --label-column NAME, or use --estimator sampled, "
                "which needs no labels."
            )
    available = len(rows)
    rows = rows.add_column(_ROW, list(range(available))).shuffle(seed=seed)
    examples, labels, numbers = [], [], []
    reasons: Dict[str, List[int]] = {}
    for row in rows:
        fields = tuple(row[column] for column in text_cols)
        reason = _unusable(kind, fields, text_cols)
        if reason is not None:
            reasons.setdefault(reason, []).append(row[_ROW])
            continue
        examples.append(fields)
        numbers.append(row[_ROW])
        if label_col is not None:
            labels.append(row[label_col])
        if len(examples) == samples:
            break
    if not examples:
        why = _skipped(reasons) if reasons else "it holds no rows"
        raise CalibrationDataError(f"Calibration data {source} has no usable example in column(s) {text_cols}: {why}.")
    shortfall = ""
    if len(examples) < samples:
        why = f" ({_skipped(reasons)})" if reasons else ""
        shortfall = f"Calibration data {source} has only {len(examples)} usable examples; {samples} were asked for{why}."
    description = {
        "source": source,
        "kind": kind,
        "text_columns": text_cols,
        "label_column": label_col,
        "rows_available": available,
    }
    return CalibrationData(kind, examples, labels if label_col else None, numbers, description, shortfall)


def _class_id(label: Any, label2id: Dict[str, int], num_labels: int, where: str) -> int:
    number = isinstance(label, (int, float)) and not isinstance(label, bool)
    if isinstance(label, str):
        if label not in label2id:
            raise CalibrationDataError(f"{where}: label {label!r} is not in the model's label2id {sorted(label2id)}.")
        label = label2id[label]
    elif not number or not float(label).is_integer():
        raise CalibrationDataError(
            f"{where}: label {label!r} is not a class id; a classifier with num_labels={num_labels} needs integer "
            f"labels 0..{num_labels - 1} or names from its label2id."
        )
    label = int(label)
    if not 0 <= label < num_labels:
        raise CalibrationDataError(f"{where}: label {label} is out of range for a model with num_labels={num_labels}.")
    return label


def encode_labels(data: CalibrationData, config, *, source: str) -> List[Any]:
    """Each example's label: a class id (names mapped through ``config.label2id``), a float for a regressor
    (``num_labels == 1``), or a list of class ids for a token classifier (one per word).

    Missing, non-integer and out-of-range labels are refused, naming the row.
    """
    label2id = {str(key): value for key, value in (config.label2id or {}).items()}
    values = []
    for label, row, fields in zip(data.labels, data.rows, data.examples):
        where = f"Calibration data {source}, row {row + 1}"
        if data.kind == TOKENS:
            if not isinstance(label, list) or len(label) != len(fields[0]):
                raise CalibrationDataError(
                    f"{where}: expected one tag per word ({len(fields[0])} words), got {label!r}."
                )
            values.append([_class_id(tag, label2id, config.num_labels, where) for tag in label])
        elif config.num_labels == 1:
            if not isinstance(label, (int, float)) or isinstance(label, bool) or not math.isfinite(label):
                raise CalibrationDataError(f"{where}: label {label!r} is not a number; this model is a regressor.")
            values.append(float(label))
        else:
            values.append(_class_id(label, label2id, config.num_labels, where))
    return values


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
    """Tokenized examples; ``collate`` pads on the right, which BERT's absolute positions require.

    Each example is a dict of model inputs plus what its loss needs: ``labels`` (a class id, a float, or per-token
    tags with IGNORE elsewhere), ``loss_mask`` (chat/completion), ``start_positions``/``end_positions`` (QA) or
    ``target_ids`` (sequence to sequence).
    """

    def __init__(
        self, data: CalibrationData, tokenizer, *, max_length: int, labels: Optional[List[Any]], source: str
    ):
        self.tokenizer = tokenizer
        self.encodings = []
        outside = 0
        for index, (fields, row) in enumerate(zip(data.examples, data.rows)):
            where = f"Calibration data {source}, row {row + 1}"
            label = labels[index] if labels is not None else None
            encoding = self._encode(data.kind, fields, label, max_length, where)
            if encoding is None:
                outside += 1
                continue
            if label is not None and data.kind != TOKENS:
                encoding["labels"] = label
            self.encodings.append(encoding)
        if outside:
            LOG.warning("Calibration data %s: dropped %d example(s) whose answer lies outside the first %d tokens.",
                        source, outside, max_length)
        if not self.encodings:
            raise CalibrationDataError(f"Calibration data {source}: no example is left to calibrate on.")

    def _encode(self, kind: str, fields, label, max_length: int, where: str) -> Optional[Dict[str, Any]]:
        tokenizer = self.tokenizer
        if kind == TEXT:
            return dict(tokenizer(*fields, truncation=True, max_length=max_length, return_attention_mask=True))
        if kind == TOKENS:
            return _encode_words(tokenizer, fields[0], label, max_length)
        if kind == QA:
            return _encode_question(tokenizer, *fields, max_length, where)
        if kind == SEQ2SEQ:
            encoding = dict(tokenizer(fields[0], truncation=True, max_length=max_length))
            encoding[TARGETS] = tokenizer(text_target=fields[1], truncation=True, max_length=max_length)["input_ids"]
            return encoding
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

        keep = [encoding for encoding in self.encodings if scorable(encoding)]
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
            self.encodings = keep

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> dict:
        return self.encodings[index]

    def collate(self, items: List[dict]) -> Dict[str, torch.Tensor]:
        features = [{k: v for k, v in item.items() if k in _PADDED_BY_TOKENIZER} for item in items]
        batch = dict(self.tokenizer.pad(features, padding=True, return_tensors="pt"))
        length = batch["input_ids"].shape[1]
        for key in set(items[0]) - _PADDED_BY_TOKENIZER:
            values = [item[key] for item in items]
            if not isinstance(values[0], list):  # one value per example: class id, float, span positions
                batch[key] = torch.tensor(values)
                continue
            fill = 0 if key == "loss_mask" else IGNORE
            width = max(map(len, values)) if key == TARGETS else length
            batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values])
        return batch


def _encode_words(tokenizer, words: List[str], tags: Optional[List[int]], max_length: int) -> Dict[str, Any]:
    """A word list, with each word's tag on its first sub-token and IGNORE elsewhere (0 where no tags are given:
    the sampled estimator only needs to know which tokens are scored)."""
    encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    labels, previous = [], None
    for word in encoding.word_ids():
        first = word is not None and word != previous
        labels.append((tags[word] if tags is not None else 0) if first else IGNORE)
        previous = word
    encoding = dict(encoding)
    encoding["labels"] = labels
    return encoding


def _encode_question(tokenizer, question: str, context: str, answers: Dict, max_length: int, where: str):
    """SQuAD-style: the answer's first and last token in (question, context); None if the context window cut it off."""
    texts, starts = answers.get("text"), answers.get("answer_start")
    if not texts or not starts or not isinstance(texts[0], str) or not isinstance(starts[0], int):
        raise CalibrationDataError(
            f"{where}: answers must be {{text: [...], answer_start: [...]}} with at least one answer, got {answers!r}."
        )
    first, last = starts[0], starts[0] + len(texts[0])
    if context[first:last] != texts[0]:
        raise CalibrationDataError(f"{where}: the answer {texts[0]!r} is not at character {first} of the context.")
    encoding = tokenizer(question, context, truncation="only_second", max_length=max_length, return_offsets_mapping=True)
    offsets, sequence = encoding.pop("offset_mapping"), encoding.sequence_ids()
    tokens = [i for i, part in enumerate(sequence) if part == 1]
    start = next((i for i in tokens if offsets[i][0] <= first < offsets[i][1]), None)
    end = next((i for i in reversed(tokens) if offsets[i][0] < last <= offsets[i][1]), None)
    if start is None or end is None:
        return None
    encoding = dict(encoding)
    encoding["start_positions"], encoding["end_positions"] = start, end
    return encoding


def prepare_tokenizer(tokenizer, pad_token_id: Optional[int] = None):
    """Right padding, with the model's own pad token where its config names one (a decoder's sequence classifier
    finds each example's last token by it), else the tokenizer's, else EOS (masked out via attention_mask)."""
    tokenizer.padding_side = "right"
    if pad_token_id is not None and tokenizer.pad_token_id != pad_token_id and pad_token_id < len(tokenizer):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
