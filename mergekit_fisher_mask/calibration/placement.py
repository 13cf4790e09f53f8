"""Where the model runs: load dtype, accelerate's big-model dispatch (device maps, CPU and disk offload), each
data-parallel process's share of the GPUs, activation checkpointing, and the memory a micro-batch may use.

Placement never changes the result beyond float round-off: masks are created on each layer's execution device,
and offloaded layers run under non-reentrant activation checkpointing, so their weights are loaded for the forward
pass and again for the recomputation in backward rather than held for the whole pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

from ..architectures import NodeShape
from ..checkpoints import check_weights
from ..errors import ModelLoadError, SettingsError, option
from ..settings import CalibrationSettings
from ..tasks import task_of

LOG = logging.getLogger(__name__)

CPU_ACTIVATION_BUDGET = 1 << 30  # bytes of saved activations per backward pass on a CPU
GPU_FREE_FRACTION = 0.6  # of the memory free on a GPU after loading, the share activations may take
CPU_LOGITS_CHUNK = 64 << 20  # bytes of float32 logits an LM-loss chunk may hold on a CPU
GPU_LOGITS_FRACTION = 0.05  # on a GPU: this share of the free memory, between the CPU's chunk and 1 GiB
GPU_LOGITS_CHUNK_MAX = 1 << 30
_OFFLOADED = ("cpu", "disk")


@dataclass(frozen=True)
class Placement:
    """Where a loaded model runs, as far as calibration needs to know."""

    input_device: torch.device  # where batches go
    device_map: Optional[Dict[str, Union[int, str]]] = None  # transformers' hf_device_map, if dispatched
    execution_devices: tuple = ()

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Placement":
        """Read a model's placement: accelerate's dispatch if it was device-mapped, else its parameters' device."""
        device_map = getattr(model, "hf_device_map", None)
        if not device_map or len(device_map) == 1 and not any(hasattr(m, "_hf_hook") for m in model.modules()):
            return cls(next(model.parameters()).device)
        hooked = [m for m in model.modules() if getattr(m, "_hf_hook", None) is not None]
        devices = tuple(sorted({execution_device(m) for m in hooked}, key=str))
        return cls(execution_device(model.get_input_embeddings()), dict(device_map), devices)

    @property
    def checkpointing(self) -> bool:
        """Offloaded layers, or a model spread over several devices, run under activation checkpointing."""
        if not self.device_map:
            return False
        places = {str(place) for place in self.device_map.values()}
        return self.offloaded or len(places - {"cpu", "disk"}) > 1

    @property
    def offloaded(self) -> bool:
        """Some weights live off the execution device (on disk, or in host memory for a GPU) and are loaded per use."""
        places = {str(place) for place in (self.device_map or {}).values()}
        return "disk" in places or ("cpu" in places and self.input_device.type != "cpu")

    def _free_accelerator_memory(self) -> Optional[int]:
        """Bytes free on the tightest execution accelerator (None on a CPU, or where the backend cannot tell)."""
        devices = [d for d in self.execution_devices or (self.input_device,) if d.type not in ("cpu", "meta")]
        free = [free_memory(d) for d in devices]
        return None if not devices or None in free else min(free)

    def activation_budget(self) -> int:
        """Bytes of saved activations one micro-batch may hold: a share of the memory really free on the tightest
        execution GPU, or a fixed budget on a CPU."""
        free = self._free_accelerator_memory()
        return CPU_ACTIVATION_BUDGET if free is None else int(GPU_FREE_FRACTION * free)

    def logits_chunk(self) -> int:
        """Bytes of float32 logits one chunk of the LM loss may hold: on a GPU, larger chunks mean fewer, larger
        kernels over the vocabulary (the CPU's 64 MiB would be 25 chunks of 21 tokens for 16 x 512 at 49k vocab)."""
        free = self._free_accelerator_memory()
        return CPU_LOGITS_CHUNK if free is None else int(min(max(GPU_LOGITS_FRACTION * free, CPU_LOGITS_CHUNK),
                                                             GPU_LOGITS_CHUNK_MAX))


def accelerator_type() -> Optional[str]:
    """The kind of accelerator torch finds (CUDA, XPU, MPS, ...), or None on a machine without one."""
    current = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return current.type if current is not None else None


def check_device_available(device, *, name: str) -> None:
    """Refuse, before any work, a device this machine does not have (``cuda:0`` on a CPU-only machine, GPU 3 of 2);
    ``device`` is a name or, as in device maps, a GPU index."""
    kind = accelerator_type()
    count = torch.accelerator.device_count() if kind else 0
    if isinstance(device, int) and kind is None:
        raise SettingsError(f"{option(name)} asks for GPU {device}, and this machine has no accelerator. Place the model "
                            "on cpu (or disk), or run where a GPU is.")
    try:
        device = torch.device(kind, device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingsError(f"{option(name)}: {device!r} is not a device (e.g. cpu, disk, 0, cuda:1).") from None
    if device.type in ("cpu", "meta"):
        return
    if device.type != kind or (device.index or 0) >= count:
        present = f"{count} {kind} device(s)" if kind else "no accelerator"
        raise SettingsError(f"{option(name)} asks for device {device}, and this machine has {present}. Choose a device "
                            "it has (cpu, or a GPU index below the count), or run where that device is.")


def check_device_map(settings: CalibrationSettings):
    """The settings' device map as transformers takes it, every device in it checked to exist here."""
    device_map = settings.device_map_value()
    if isinstance(device_map, dict):
        for place in device_map.values():
            if place != "disk":
                check_device_available(place, name="device_map")
    return device_map


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on an accelerator device, or None where its backend cannot tell. ``torch.accelerator`` answers
    from torch 2.9; older versions ask the device type's own module (``torch.<type>.mem_get_info``)."""
    queries = [getattr(torch.accelerator, "get_memory_info", None),
               getattr(getattr(torch, device.type, None), "mem_get_info", None)]
    for query in filter(None, queries):
        try:
            return int(query(device)[0])
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            continue
    return None


_GLIBC_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 20


def return_freed_weights_to_the_os() -> bool:
    """Make glibc serve allocations of 1 MiB and more with mmap, so that freed ones go back to the OS at once.

    An offloaded layer's weights are loaded into host memory for each use and freed after it. glibc's dynamic mmap
    threshold grows to 32 MiB after the first large free, so later weight buffers come from its heap, which
    fragments and is not returned: calibrating a 453M-parameter model from disk then held 1.1 GB more than needed.
    Setting the threshold once fixes it for the process (glibc offers no way to undo it; it only costs an mmap per
    large allocation). Returns False where malloc is not glibc's.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_GLIBC_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device a (possibly dispatched) module computes on: its accelerate hook's, else its parameters'."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in [hook] + list(getattr(hook, "hooks", [])):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(accelerator_type(), device) if isinstance(device, int) else torch.device(device)
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _process_max_memory(settings: CalibrationSettings, accelerator) -> Optional[Dict[Union[int, str], Union[int, str]]]:
    """``max_memory`` for this process: with several processes on a node, each gets an even share of the GPUs."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes if accelerator else 1))
    user = dict(settings.max_memory or {})
    gpus = torch.accelerator.device_count()
    if local_processes <= 1 or gpus == 0:
        return user or None
    per_process = gpus // local_processes
    if per_process == 0:
        raise SettingsError(
            f"{local_processes} processes share {gpus} GPU(s); with --device-map each process needs at least one. "
            "Launch at most one process per GPU."
        )
    rank = accelerator.local_process_index
    mine = range(rank * per_process, (rank + 1) * per_process)
    memory: Dict[Union[int, str], Union[int, str]] = {}
    for gpu in mine:
        if gpu in user:
            memory[gpu] = user[gpu]
            continue
        free = free_memory(torch.device(accelerator_type(), gpu))
        if free is None:
            raise SettingsError(f"The free memory of device {gpu} is unknown here; give it with --max-memory {gpu}=SIZE.")
        memory[gpu] = int(0.9 * free)
    memory.update({key: value for key, value in user.items() if not isinstance(key, int)})
    return memory


def load_model(
    model_dir: Path, config, settings: CalibrationSettings, accelerator, *, offload_folder: Optional[Path] = None,
    attn_implementation: Optional[str] = None,
) -> torch.nn.Module:
    """Load ``model_dir`` with the head its config names, in the settings' dtype and placement (weights offloaded
    to disk go to ``offload_folder``, this run's own folder inside the settings' ``offload_folder``)."""
    import transformers

    task = task_of(config, where=str(model_dir))
    NodeShape.from_config(config, where=str(model_dir))  # unsupported architectures fail before loading weights
    check_weights(model_dir)
    on_gpu = accelerator.device.type != "cpu"
    dtype = settings.dtype.resolve(config, on_gpu=on_gpu)
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if settings.device_map:
        kwargs["device_map"] = check_device_map(settings)
        kwargs["max_memory"] = _process_max_memory(settings, accelerator)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    auto = getattr(transformers, task.auto_class)
    try:
        model = auto.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = f" Pass {option('offload_folder')} DIR for weights that do not fit in memory." if "offload" in first else ""
        raise ModelLoadError(f"{model_dir}: cannot load the model ({first}).{hint}") from error
    device_map = getattr(model, "hf_device_map", None)
    if not settings.device_map:
        model.to(accelerator.device)
    elif device_map:
        LOG.info("Device map: %s", _summary(device_map))
    else:  # transformers places a model that fits on one device there, without dispatching it
        LOG.info("Device map: the whole model fits on %s.", next(model.parameters()).device)
    return model


def _summary(device_map: Dict[str, Union[int, str]]) -> str:
    counts: Dict[str, int] = {}
    for place in device_map.values():
        counts[str(place)] = counts.get(str(place), 0) + 1
    return ", ".join(f"{count} module group(s) on {place}" for place, count in sorted(counts.items()))


@contextlib.contextmanager
def checkpointed(layers: List[torch.nn.Module], enabled: bool = True) -> Iterator[None]:
    """Run each layer under non-reentrant activation checkpointing; the layers are restored on exit.

    transformers' own ``gradient_checkpointing_enable`` acts only in training mode, and calibration runs in eval
    mode (no dropout), so the layers' ``forward`` is wrapped here instead. Hooks inside a layer (the mask hooks,
    accelerate's weight loading) run again in the recomputation.
    """
    if not enabled:
        yield
        return
    originals = []
    try:
        for layer in layers:
            forward = layer.forward
            originals.append((layer, "forward" in vars(layer), forward))

            def wrapped(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            layer.forward = wrapped
        yield
    finally:
        for layer, own, forward in originals:
            if own:
                layer.forward = forward  # an instance attribute (e.g. accelerate's hook wrapper) goes back
            else:
                del layer.forward
