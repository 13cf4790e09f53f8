"""Model checkpoints: resolve a folder or Hub id, read its config and weight files with clear errors, fingerprint it.

Both calibration (which records a fingerprint) and merging (which checks it) read checkpoints through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from .errors import ModelLoadError
from .paths import looks_local, user_path

_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja"]
# The fingerprint hashes every tensor's name, dtype and shape plus a few values from its first and last rows.
# That reads kilobytes, not the checkpoint, yet it tells apart two fine-tunes of one base model.
_SAMPLE_VALUES = 16
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def resolve_model_dir(name_or_path) -> Path:
    """Return a local folder for a model: the path itself (``~`` expanded, relative to the current folder), or the
    Hub snapshot (downloaded if needed)."""
    text = os.fspath(name_or_path)
    local = user_path(text)
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"Model {text} is a file; pass the folder that holds config.json and the weights.")
    where = f"{local}; model paths are resolved against the current folder {Path.cwd()}"
    if looks_local(text):
        raise ModelLoadError(f"Model {text!r} does not exist ({where}). Pass the folder that holds config.json.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as error:  # the Hub client raises many types; all mean "not reachable or not found"
        raise ModelLoadError(
            f"Model {text!r} is neither a local folder ({where}) nor a downloadable Hugging Face Hub repo "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Pass a folder that "
            "holds config.json and *.safetensors, or a Hub id while online."
        ) from error


def load_config(model_dir: Path):
    """The model's transformers config; a one-line error naming the folder if it is missing or unreadable."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir}: no config.json. Expected a Hugging Face model folder (config.json plus *.safetensors "
            "or pytorch_model.bin), as save_pretrained writes it."
        )
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(f"{path} cannot be read as a transformers config ({first}).") from error


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model",
)


def has_tokenizer(model_dir: Path) -> bool:
    """Whether the folder holds tokenizer files (transformers would otherwise build an empty tokenizer)."""
    return any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES)


def weight_files(model_dir: Path) -> List[Path]:
    """The weight files of a model folder: safetensors shards (preferred, as transformers does) or pickle .bin."""
    model_dir = Path(model_dir)
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (PICKLE_INDEX, "pytorch_model.bin")):
        index = model_dir / index_name
        if index.is_file():
            try:
                with open(index, encoding="utf-8") as handle:
                    shards = sorted(set(json.load(handle)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ModelLoadError(f"{index}: not a valid weight index ({error!r}).") from error
            missing = [shard for shard in shards if not (model_dir / shard).is_file()]
            if missing:
                raise ModelLoadError(f"{index} lists {missing[0]}, which is not in {model_dir}.")
            return [model_dir / shard for shard in shards]
        if (model_dir / single).is_file():
            return [model_dir / single]
    return []


def _load_pickle(file: Path) -> Dict[str, torch.Tensor]:
    """A .bin state dict, memory-mapped where possible; only plain tensors are ever unpickled."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(
            f"{file}: torch cannot load this pickle checkpoint safely ({first}). Convert it to safetensors with a "
            "trusted copy of the model, or re-save it with save_pretrained."
        ) from error


def iter_tensor_headers(model_dir: Path) -> Iterator[Tuple[str, str, Tuple[int, ...], object, Path]]:
    """Yield ``(name, dtype, shape, reader, file)`` for every tensor, where ``reader(start, stop)`` returns rows.

    Safetensors are read from their headers; a truncated or corrupt file raises :class:`ModelLoadError`.
    """
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in sorted(handle.keys()):
                        view = handle.get_slice(name)
                        yield name, str(view.get_dtype()), tuple(view.get_shape()), lambda a, b, v=view: v[a:b], file
            except SafetensorError as error:
                raise ModelLoadError(f"{file}: not a readable safetensors file ({error}). Is it truncated?") from error
        else:
            state = _load_pickle(file)
            for name in sorted(state):
                tensor = state[name]
                yield name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), lambda a, b, t=tensor: t[a:b], file


def check_weights(model_dir: Path) -> None:
    """Fail early, naming the file, if the folder has no weights or a weight file cannot be read."""
    if not weight_files(model_dir):
        raise ModelLoadError(
            f"{model_dir}: no weights (model.safetensors, pytorch_model.bin or a sharded index). "
            "Save the model with save_pretrained."
        )
    for _ in iter_tensor_headers(model_dir):
        pass


def shard_map(model_dir: Path) -> Dict[str, str]:
    """Tensor name -> name of the weight file that holds it."""
    return {name: file.name for name, _, _, _, file in iter_tensor_headers(Path(model_dir))}


def model_fingerprint(model_dir: Path) -> str:
    """A short content hash of a model folder's weights, whatever their format (``st:`` safetensors, ``pt:`` pickle)."""
    digest = hashlib.sha256()
    count = 0
    for name, dtype, shape, rows, _ in iter_tensor_headers(Path(model_dir)):
        count += 1
        digest.update(f"{name}|{dtype}|{list(shape)}".encode())
        if not shape or shape[0] == 0:
            continue
        first = rows(0, 1).flatten()[:_SAMPLE_VALUES]
        last = rows(shape[0] - 1, shape[0]).flatten()[-_SAMPLE_VALUES:]
        for values in (first, last):
            digest.update(values.float().numpy().tobytes())
    if count == 0:
        raise ModelLoadError(f"{model_dir}: no weights to fingerprint (no safetensors or .bin files).")
    kind = "st" if weight_files(Path(model_dir))[0].suffix == ".safetensors" else "pt"
    return f"{kind}:" + digest.hexdigest()[:24]


_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "int8": 1,
                "uint8": 1, "bool": 1, "F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1,
                "BOOL": 1}


def weight_bytes(model_dir: Path, dtype: Optional[str] = None) -> int:
    """Bytes of a model's tensors as stored, or with every floating-point tensor in ``dtype``."""
    total = 0
    for _, stored, shape, _, _ in iter_tensor_headers(Path(model_dir)):
        count = 1
        for size in shape:
            count *= size
        floating = stored in ("F64", "F32", "BF16", "F16", "float64", "float32", "bfloat16", "float16")
        total += count * _DTYPE_BYTES.get(dtype if dtype and floating else stored, 4)
    return total
