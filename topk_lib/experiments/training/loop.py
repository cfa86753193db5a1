"""What both training experiments share: the learning-rate schedule, seeded batches, progress bars,
the optimisation step, the "full" label for exact settings, and the cached record of one run.

Every finished run is one small JSON file ``paths.results() / "training" / task / f"{name}_{hash}.json"``
(:func:`topk_lib.infra.cache.cached_record`); the hash covers the run's whole configuration, so a
changed setting never reuses an old result, and an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from topk_lib.infra import paths
from topk_lib.experiments.sweep import model_record

__all__ = ["k_label", "training_precision", "autocast", "lr_at", "batches", "optimizer_step", "progress_bar", "run_record"]


def k_label(k) -> str:
    """``"full"`` for exact/dense (``None``), else ``str(k)``: the label tables and figures use."""
    return "full" if k is None else str(k)


def training_precision(device=None, dtype=None) -> tuple[torch.device, torch.dtype, dict]:
    """``(device, compute dtype, record config)`` of a training run.

    ``device``/``dtype`` as :func:`topk_lib.hf.loading.load_model` takes them (``"auto"``: CUDA
    when present, bfloat16 there). Weights and optimizer state stay float32; a half ``dtype``
    is mixed precision (:func:`autocast`). The config is empty for float32 on the CPU, so the
    records of CPU runs keep their keys, and names device and dtype otherwise.
    """
    from topk_lib.hf.loading import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device.type == "cuda")
    plain = device.type == "cpu" and dtype == torch.float32
    return device, dtype, {} if plain else {"device": device.type, "dtype": str(dtype).removeprefix("torch.")}


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward passes when ``dtype`` is a half type; nothing for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def lr_at(step: int, *, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (steps - step) / max(1, steps - warmup))


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches, reshuffling every epoch (deterministic in ``generator``)."""
    order = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """Backward ``loss``, clip the gradient norm to 1, step; returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over training steps that disappears when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not enabled)


def run_record(task: str, name: str, *, config: dict, compute, root=None, required=(), mark=None) -> dict:
    """The cached record of one run, or ``compute()`` it and cache it.

    The record is ``{"task", "name", "config", **mark, **compute()}`` in
    ``root / task / f"{name}_{config_key(config)}.json"``; ``root`` defaults to
    ``paths.results() / "training"`` (read at call time). A cached record that is cut or lacks
    one of those keys or of ``required`` (what the caller reads) is reported and recomputed.
    ``mark`` (``{"model_fingerprint": ...}`` of the model the run starts from) ties the record
    to those weights: one computed from other weights is not used
    (:func:`topk_lib.experiments.sweep.model_record`).
    """
    root = paths.results() / "training" if root is None else Path(root)
    mark = dict(mark or {})
    return model_record(root / task / name, config=config, mark=mark, key_length=10,
                        required=("task", "name", "config", *required),
                        compute=lambda: {"task": task, "name": name, "config": config, **mark, **compute()})
