"""Score tensors: per-layer L2 normalisation, `scores.safetensors` save and load (normalised and
`_raw` scores per mask axis, docs/formats.md), and random scores, the baseline a real method must
beat. The scoring itself (gradient and activation methods) is stages/score.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minima_cli.errors import MinimaError
from minima_cli.fsutil import read_manifest
from minima_cli.model.arch import ModelShape
from minima_cli.model.masks import Masks

SCORES_FILE = "scores.safetensors"


def normalize_scores(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer L2 normalisation of [layers, units] scores; 1-D scores by their own L2 norm."""
    return {
        axis: scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        for axis, scores in raw.items()
    }


def random_scores(shape: ModelShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random scores of every mask's shape: the floor a real method must beat, and a
    stand-in for planning in tests and benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    return {axis: torch.rand(mask.shape, generator=generator)
            for axis, mask in Masks.ones(shape).as_dict().items()}


def save_scores(directory: Path, raw: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {**normalize_scores(raw), **{f"{axis}_raw": t for axis, t in raw.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / SCORES_FILE, metadata)


def load_scores(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a score directory (or its scores.safetensors): (tensors, manifest)."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not (directory / SCORES_FILE).is_file():
        raise MinimaError(f"scores not found: {directory / SCORES_FILE}")
    manifest = read_manifest(directory)
    if manifest.get("stage") != "score":
        raise MinimaError(f"{directory}: not a score output (stage {manifest.get('stage')!r})")
    return read_scores_file(directory / SCORES_FILE), manifest


def read_scores_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a scores.safetensors, whole and finite: a truncated or corrupt file, or
    NaN scores (from a model that was already broken), are one line, not a traceback or a plan
    ranked by NaN."""
    from minima_cli.model.tensors import read_safetensors_specs

    read_safetensors_specs(path)  # header and length checked before the library reads it
    try:
        tensors = load_file(path)
    except Exception as error:  # the safetensors library raises its own error type
        raise MinimaError(f"{path}: corrupt scores file ({error})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MinimaError(f"{path}: score {name} holds NaN or infinite values (score a "
                              "healthy model again)")
    return tensors
