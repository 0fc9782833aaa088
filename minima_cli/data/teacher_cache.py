"""Teacher top-k caches: `teacher_topk`, the shard writer `minima cache-teacher` uses, and
`TeacherCache`, which `minima distill --teacher-cache DIR` reads instead of running the teacher.

Layout of the cache directory (written atomically; details in docs/formats.md):
- `source-<i>-<shard>.safetensors`: `logprobs` `[blocks, seq_len, k]` in the cache dtype
  (float16 by default), the top k of log_softmax of the teacher's logits at T = 1 over the
  tokenizer's real vocabulary, and `indices` int32, their token ids, for the training blocks
  `[first, first + blocks)` of data source i, in block order;
- `minima.json`: the teacher and data fingerprints, k, seq_len and the shard table.
A block is looked up by (source, row), the key `MixedBlockStream.last_picks` reports, so any data
order (seed, mixture weights, resume) reads the right rows. The cache is tied to the prepared
data (tokenizer, seq_len, seed, split): distill refuses a cache made for other data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minima_cli.data.streams import PreparedData
from minima_cli.errors import MinimaError, first_line
from minima_cli.fsutil import read_manifest
from minima_cli.losses import TopK
from minima_cli.progress import step_progress

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int,
                 vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax over the real vocabulary (padded embedding rows excluded)."""
    logprobs = logits[..., :vocab_size].float().log_softmax(-1)
    values, indices = logprobs.topk(k, dim=-1)
    return values, indices.to(torch.int32)


def shard_name(source: int, shard: int) -> str:
    return f"source-{source}-{shard:05d}.safetensors"


def write_teacher_cache(teacher: torch.nn.Module, prepared: PreparedData, directory: Path, *,
                        k: int, vocab_size: int, batch_size: int, blocks_per_shard: int,
                        dtype: torch.dtype, progress: bool) -> list[dict[str, Any]]:
    """Fill `directory` with the shards; returns the shard table for the manifest."""
    table = []
    total = sum(len(blocks) for blocks in prepared.train)
    device = next(teacher.parameters()).device
    with step_progress("cache-teacher", total, enabled=progress) as bar:
        for source, blocks in enumerate(prepared.train):
            for shard, first in enumerate(range(0, len(blocks), blocks_per_shard)):
                part = blocks[first:first + blocks_per_shard]
                values, indices = [], []
                for start in range(0, len(part), batch_size):
                    batch = part[start:start + batch_size].long().to(device)
                    v, i = teacher_topk(teacher(input_ids=batch).logits, k, vocab_size)
                    values.append(v.to(dtype).cpu())
                    indices.append(i.cpu())
                    for _ in range(len(batch)):
                        bar.update(batch.shape[1])
                name = shard_name(source, shard)
                save_file({"logprobs": torch.cat(values), "indices": torch.cat(indices)},
                          directory / name)
                table.append({"file": name, "source": source, "first": first,
                              "blocks": len(part)})
    return table


class TeacherCache:
    """Reads the top-k rows of the blocks a batch holds (memory-mapped shards)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MinimaError(f"teacher cache {self.path} does not exist")
        manifest = read_manifest(self.path)
        if manifest.get("stage") != "cache-teacher":
            raise MinimaError(f"{self.path} is not a teacher cache (no cache-teacher "
                              "minima.json): make one with `minima cache-teacher`")
        self.manifest = manifest
        self._handles: dict[str, Any] = {}
        try:
            self.k = int(manifest["config"]["k"])
            self.data_fingerprint = manifest["inputs"]["data"]["fingerprint"]
            self.teacher_fingerprint = manifest["inputs"]["teacher"]["fingerprint"]
            self.tokenizer_vocab = int(manifest["config"]["vocab_size"])
            self._shards = manifest["shards"]
            self.check_shards()
        except (KeyError, TypeError, ValueError) as error:  # a hand-edited minima.json
            raise MinimaError(f"teacher cache {self.path}: corrupt minima.json (bad or missing "
                              f"{first_line(error)})") from None

    def check_shards(self) -> None:
        """Every shard present, whole and of the shape its table entry says, before training
        starts: a truncated shard would otherwise fail mid-run, deep in the safetensors library.
        Reads headers only."""
        from minima_cli.model.tensors import read_safetensors_specs

        seq_len = int(self.manifest["config"]["seq_len"])
        for entry in self._shards:
            path = self.path / entry["file"]
            if not path.is_file():
                raise MinimaError(f"teacher cache {self.path}: shard {entry['file']} is missing")
            specs = {spec.name: spec for spec in read_safetensors_specs(path)}
            want = (int(entry["blocks"]), seq_len, self.k)
            for name in ("logprobs", "indices"):
                if name not in specs or specs[name].shape != want:
                    raise MinimaError(f"teacher cache {self.path}: shard {entry['file']} does "
                                      f"not hold {name} of shape {list(want)}")

    def check_topk(self, topk: int) -> None:
        """The run's --topk must be the cache's k: with fewer tokens than asked the loss would
        silently differ from the online top-k it stands for (and the manifest would lie)."""
        if topk != self.k:
            raise MinimaError(f"teacher cache {self.path} holds the teacher's top {self.k} "
                              f"tokens but --topk is {topk}: pass --topk {self.k} (or make "
                              f"the cache with --k {topk})")

    def check_data(self, prepared: PreparedData) -> None:
        if prepared.fingerprint != self.data_fingerprint:
            raise MinimaError(f"teacher cache {self.path} was made for other data (data, "
                              "tokenizer, seq_len, seed or validation split differ)")

    def _shard(self, source: int, row: int) -> tuple[Any, int]:
        for entry in self._shards:
            if entry["source"] == source and entry["first"] <= row < entry["first"] + entry[
                    "blocks"]:
                handle = self._handles.get(entry["file"])
                if handle is None:
                    handle = safe_open(str(self.path / entry["file"]), framework="pt")
                    self._handles[entry["file"]] = handle
                return handle, row - entry["first"]
        raise MinimaError(f"teacher cache {self.path} has no block {row} of source {source}")

    def lookup(self, picks: list[tuple[int, int]], device: torch.device) -> TopK:
        values, indices = [], []
        for source, row in picks:
            handle, local = self._shard(source, row)
            values.append(handle.get_slice("logprobs")[local:local + 1])
            indices.append(handle.get_slice("indices")[local:local + 1])
        return TopK(torch.cat(values).to(device), torch.cat(indices).to(device).long())
