"""Calibration data: load a local file or a ``datasets`` name, pick text/label columns, tokenize, pad right."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .errors import CalibrationDataError

LOG = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"), ("text_a", "text_b"))
_LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class CalibrationData:
    """Selected examples: one or two text fields per example, optional labels, and a description for metadata."""

    texts: List[Sequence[str]]  # each item: (text,) or (text_a, text_b)
    labels: Optional[List]  # None when the estimator does not need labels
    description: Dict


def load_rows(source: str):
    """Load a local .jsonl/.json/.csv/.parquet/.txt file, or ``name[:config][@split]`` from ``datasets``."""
    import datasets

    suffix = os.path.splitext(source)[1].lower()
    if os.path.exists(source):
        if suffix not in _BUILDERS:
            raise CalibrationDataError(
                f"Calibration data {source}: unsupported file type {suffix!r}; use one of {', '.join(_BUILDERS)}."
            )
        # A .txt file yields one example per paragraph (blank-line separated), not per line.
        extra = {"sample_by": "paragraph"} if suffix == ".txt" else {}
        return datasets.load_dataset(_BUILDERS[suffix], data_files=source, split="train", **extra)
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


def _pick_text_columns(columns: Sequence[str], requested: Optional[Sequence[str]], source: str) -> List[str]:
    if requested:
        missing = [column for column in requested if column not in columns]
        if missing:
            raise CalibrationDataError(
                f"Calibration data {source} has no column {missing[0]!r} (columns: {', '.join(columns)}). "
                "Pass --text-column with one of those (twice for sentence pairs)."
            )
        if len(requested) > 2:
            raise CalibrationDataError(f"At most two text columns (a sentence pair) are supported; got {requested}.")
        return list(requested)
    for pair in _PAIR_COLUMNS:
        if all(column in columns for column in pair):
            return list(pair)
    for column in _TEXT_COLUMNS:
        if column in columns:
            return [column]
    raise CalibrationDataError(
        f"Calibration data {source}: could not guess the text column among {', '.join(columns)}. "
        "Pass --text-column NAME (twice for sentence pairs)."
    )


def select_examples(
    source: str,
    *,
    samples: int,
    seed: int,
    text_columns: Optional[Sequence[str]] = None,
    label_column: Optional[str] = None,
    needs_labels: bool = False,
) -> CalibrationData:
    """Shuffle with ``seed``, drop empty texts and take the first ``samples`` rows; warn if fewer exist."""
    rows = load_rows(source)
    columns = list(rows.column_names)
    text_cols = _pick_text_columns(columns, text_columns, source)
    label_col = None
    if needs_labels:
        label_col = label_column or next((c for c in _LABEL_COLUMNS if c in columns), None)
        if label_col is None or label_col not in columns:
            raise CalibrationDataError(
                f"Calibration data {source} has no label column {label_column or 'label'!r} "
                f"(columns: {', '.join(columns)}). Pass --label-column NAME, or use --estimator expected/sampled, "
                "which need no labels."
            )
    rows = rows.shuffle(seed=seed)
    texts, labels = [], []
    for row in rows:
        fields = tuple(row[column] for column in text_cols)
        if any(not isinstance(text, str) or not text.strip() for text in fields):
            continue
        texts.append(fields)
        if label_col is not None:
            labels.append(row[label_col])
        if len(texts) == samples:
            break
    if not texts:
        raise CalibrationDataError(f"Calibration data {source} has no non-empty examples in column(s) {text_cols}.")
    if len(texts) < samples:
        LOG.warning("Calibration data %s has only %d usable examples; %d were asked for.", source, len(texts), samples)
    description = {
        "source": source,
        "text_columns": text_cols,
        "label_column": label_col,
        "rows_available": len(rows),
    }
    return CalibrationData(texts=texts, labels=labels if label_col else None, description=description)


def encode_labels(labels: Sequence, config, *, source: str) -> torch.Tensor:
    """Map class names through ``config.label2id`` and check ids; regression (num_labels == 1) keeps floats."""
    if config.num_labels == 1:
        return torch.tensor([float(label) for label in labels])
    label2id = {str(key): value for key, value in (config.label2id or {}).items()}
    ids = []
    for label in labels:
        if isinstance(label, str):
            if label not in label2id:
                raise CalibrationDataError(
                    f"Calibration data {source}: label {label!r} is not in the model's label2id {sorted(label2id)}."
                )
            label = label2id[label]
        label = int(label)
        if not 0 <= label < config.num_labels:
            raise CalibrationDataError(
                f"Calibration data {source}: label {label} is out of range for a model with "
                f"num_labels={config.num_labels}."
            )
        ids.append(label)
    return torch.tensor(ids)


class CalibrationDataset(torch.utils.data.Dataset):
    """Tokenized examples; ``collate`` pads on the right, which BERT's absolute positions require."""

    def __init__(self, data: CalibrationData, tokenizer, *, max_length: int, labels: Optional[torch.Tensor]):
        self.tokenizer = tokenizer
        self.encodings = [
            tokenizer(*fields, truncation=True, max_length=max_length, return_attention_mask=True)
            for fields in data.texts
        ]
        self.labels = labels

    def drop_short(self, minimum_tokens: int, *, source: str) -> None:
        """Drop examples with fewer than ``minimum_tokens`` tokens (warn); fail if none remain."""
        keep = [i for i, e in enumerate(self.encodings) if sum(e["attention_mask"]) >= minimum_tokens]
        if not keep:
            raise CalibrationDataError(f"Calibration data {source}: every example has fewer than {minimum_tokens} tokens.")
        if len(keep) < len(self.encodings):
            LOG.warning(
                "Calibration data %s: dropped %d example(s) with fewer than %d tokens.",
                source, len(self.encodings) - len(keep), minimum_tokens,
            )
            self.encodings = [self.encodings[i] for i in keep]
            if self.labels is not None:
                self.labels = self.labels[keep]

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.encodings[index])
        item["index"] = index
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item

    def collate(self, items: List[dict]) -> Dict[str, torch.Tensor]:
        features = [{k: v for k, v in item.items() if k not in ("labels", "index")} for item in items]
        batch = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        batch["index"] = torch.tensor([item["index"] for item in items])
        if self.labels is not None:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        return dict(batch)


def prepare_tokenizer(tokenizer):
    """Right padding, and a pad token for decoder tokenizers that lack one (masked out via attention_mask)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
