"""Process runtime helpers: resolve `--device`, read rank and world size from the launcher's
environment, and scope torch's intra-op thread count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from minima_cli.errors import MinimaError


def resolve_device(device: str) -> str:
    """auto -> cuda when there is one; anything torch cannot use is one clear line."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise MinimaError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MinimaError(f"--device {device}: no CUDA device is available")
    return device


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process as its launcher (torchrun, accelerate, deepspeed) set
    them in the environment; (0, 1) when it was not launched as one of several. The one place
    that reads them: the training session, score's process group and the pipeline ask here."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads. Matrices this small gain nothing from more threads, and on
    a busy machine OpenMP threads spinning against other processes slow them down."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_dtype(name: str) -> torch.dtype | None:
    """A dtype option ("auto", "float32", "bfloat16", "float16") as torch's; auto is None."""
    return None if name == "auto" else getattr(torch, name)


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now (an offline switch is set, or its host
    does not resolve within `timeout` s), or None. Asked before anything would try the hub, so a
    missing local path that looks like a hub name fails at once instead of after retries."""
    import socket
    import threading
    from urllib.parse import urlparse

    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""
    found: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            found.append(True)
        except OSError:
            found.append(False)

    thread = threading.Thread(target=resolve, daemon=True)  # getaddrinfo has no timeout
    thread.start()
    thread.join(timeout)
    return None if found and found[0] else f"no network ({host} does not resolve)"
