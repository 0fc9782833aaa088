"""A run's token-block data: `prepare_data` (sources -> token stores (raw text is tokenised into
a store in the run's cache on first use, data/store.py) -> per-source train / validation split
-> EOS-separated `seq_len` blocks read from the memory map, plus the data fingerprint) and
`MixedBlockStream`, which samples blocks from the sources by weight and whose position is a
small JSON-able state, so a resumed run continues with exactly the same batches
(docs/formats.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima_cli.data.pack import blocks_from_stream, held_out_by_tokens, split_documents
from minima_cli.data.position import ResumableStream
from minima_cli.data.seeds import MIX, SHUFFLE, permutation
from minima_cli.data.sources import (
    STATE_VERSION,
    DataSource,
    data_fingerprint,
    parse_sources,
    source_fingerprint,
    tokenizer_fingerprint,
)
from minima_cli.data.store import StoreBlocks, TokenStore, held_stream, is_store, source_store
from minima_cli.errors import MinimaError


@dataclass
class PreparedData:
    """A run's data: per-source training blocks (int32 `[n_i, seq_len]`, a `StoreBlocks` read on
    demand from a token store's memory map), the validation blocks (int64 `[n_valid, seq_len]`,
    no rows without a split) and the data fingerprint."""

    sources: list[DataSource]
    train: list[Any]
    valid: torch.Tensor
    seq_len: int
    seed: int
    fingerprint: str

    def stream(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> MixedBlockStream:
        return MixedBlockStream(
            self.train, [s.weight for s in self.sources], batch_size=batch_size, seed=self.seed,
            rank=rank, world_size=world_size, fingerprint=self.fingerprint,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for the run log."""
        return {
            "sources": [
                {**asdict(s), "train_blocks": len(b)}
                for s, b in zip(self.sources, self.train, strict=True)
            ],
            "valid_blocks": len(self.valid),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
        }


def prepare_data(
    sources: str | list[Any],
    tokenizer: Any,
    *,
    seq_len: int,
    seed: int = 0,
    valid_fraction: float = 0.0,
    valid_documents: int = 0,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
    valid_tokens: int = 0,
) -> PreparedData:
    """Parse, tokenize (into a store, cached), split and pack the sources of a run.

    Each source holds out its own `valid_fraction` / `valid_documents` documents; the held-out
    documents of all sources form one validation stream, packed like the training blocks. With
    `valid_tokens` (which overrides `valid_fraction`) each source holds out seeded random
    documents until its share of `valid_tokens` is met, and the validation set is exactly
    `valid_tokens // seq_len` blocks: an evaluation costs the same whatever the corpus size.

    A token store (a directory with `store.json`, data/store.py) is a source as it is; a raw
    source is tokenised into a store in `cache_dir` on first use (`store.source_store`; without
    a `cache_dir`, in a temporary directory that lives as long as the store's blocks). Either
    way training blocks are read from the memory map on demand (`StoreBlocks`), never held in
    memory, and for raw text they are exactly the blocks the in-memory packing of the same
    documents made (`pack.pack_tokens`), so runs and their fingerprints are unchanged.
    """
    sources = parse_sources(sources, text_field)
    _check_seed(seed)
    if seq_len < 1:
        raise MinimaError(f"seq_len must be at least 1, got {seq_len}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise MinimaError("the tokenizer has no EOS token, which separates packed documents")
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    if valid_tokens < 0:
        raise MinimaError(f"valid_tokens must be >= 0, got {valid_tokens}")
    if valid_tokens:
        if valid_tokens < seq_len:
            raise MinimaError(f"--valid-tokens {valid_tokens} is less than one block of "
                              f"seq_len={seq_len}")
        valid_fraction, budget = 0.0, -(-valid_tokens // len(sources))  # each source's share
    contents = [source_fingerprint(s) for s in sources]
    train: list[Any] = []
    valid_parts = []
    for i, (source, content) in enumerate(zip(sources, contents, strict=True)):
        if is_store(source.path_or_name):
            store = _open_store(source, tokenizer_fp)
        elif cache_dir is None:  # a temporary store, removed when its last block reader goes
            temporary = tempfile.TemporaryDirectory(prefix="minima-tokens-")
            store = source_store(source, tokenizer, temporary.name, content=content,
                                 tokenizer_fp=tokenizer_fp)
            store.keep = temporary
        else:  # raw text: its store in the run's cache (errors name their file already)
            store = source_store(source, tokenizer, cache_dir, content=content,
                                 tokenizer_fp=tokenizer_fp)
        try:
            blocks, held = _store_source(
                store, seq_len, eos_id, seed=seed, source_index=i,
                valid_fraction=valid_fraction, valid_documents=valid_documents,
                valid_budget=budget if valid_tokens else 0)
        except MinimaError as e:
            raise MinimaError(f"data source {source.path_or_name}: {e}") from None
        train.append(blocks)
        if held is not None:
            valid_parts.append(held)
    valid = torch.zeros(0, seq_len, dtype=torch.long)
    if valid_parts:
        stream = np.concatenate(valid_parts)
        if len(stream) < seq_len:
            raise MinimaError(
                f"the validation split has {len(stream)} tokens but one block of seq_len={seq_len} "
                "needs more: raise valid_fraction or valid_documents"
            )
        valid = blocks_from_stream(stream, seq_len).long()
        if valid_tokens:  # exactly valid_tokens // seq_len blocks, whatever the corpus size
            valid = valid[: valid_tokens // seq_len]
    fingerprint = data_fingerprint(
        sources, contents, tokenizer_fp=tokenizer_fp, seq_len=seq_len, seed=seed,
        valid_fraction=valid_fraction, valid_documents=valid_documents,
        valid_tokens=valid_tokens,
    )
    return PreparedData(sources, train, valid, seq_len, seed, fingerprint)


def _open_store(source: DataSource, tokenizer_fp: str) -> TokenStore:
    try:
        store = TokenStore(source.path_or_name)
    except MinimaError as e:
        raise MinimaError(f"data source {source.path_or_name}: {e}") from None
    if store.tokenizer_fingerprint != tokenizer_fp:
        raise MinimaError(f"data source {source.path_or_name}: the token store was made with "
                          "another tokenizer than this run's model: tokenise the text again "
                          "with `minima tokenize --tokenizer MODEL`")
    return store


def _store_source(store: TokenStore, seq_len: int, eos_id: int, *, seed: int,
                  source_index: int, valid_fraction: float, valid_documents: int,
                  valid_budget: int) -> tuple[StoreBlocks, np.ndarray | None]:
    """A store's training blocks (memory-mapped) and its held-out validation stream (or None):
    the documents held out are drawn as the in-memory split drew them (`pack.split_documents`,
    `pack.held_out_by_tokens`), from the document count and lengths alone."""
    if valid_budget:
        held = held_out_by_tokens(store.document_length, len(store), valid_budget, seed=seed,
                                  source_index=source_index)
    elif valid_fraction or valid_documents:
        held = split_documents(len(store), seed=seed, source_index=source_index,
                               valid_fraction=valid_fraction,
                               valid_documents=valid_documents)[1]
    else:
        held = np.zeros(0, np.int64)
    blocks = StoreBlocks(store, seq_len, eos_id, held)
    return blocks, (held_stream(store, held, eos_id) if len(held) else None)


def shuffle_order(n_blocks: int, seed: int, source_index: int, epoch: int) -> np.ndarray:
    """The order in which a source serves its blocks in one epoch: a pure function of its
    arguments, so a resumed stream rebuilds it from (seed, source, epoch) alone. It is the one
    per-rank array that grows with the corpus: 4 bytes a block (uint32, `seeds.permutation`)."""
    return permutation(n_blocks, [seed, SHUFFLE, source_index, epoch])


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MinimaError(f"seed must be a non-negative integer, got {seed!r}")


class MixedBlockStream(ResumableStream):
    """An endless stream of int64 `[batch_size, seq_len]` batches drawn from several sources.

    Every block of the global sequence comes from source `i` with probability
    `weight_i / sum(weights)` (one PCG64 draw per block, so the block sequence does not depend on
    the batch size). Each source serves its blocks in a seeded random order, redrawn each time it
    is exhausted (a new epoch of that source). With `world_size` > 1 each global batch of
    `batch_size * world_size` blocks is cut into per-rank slices: every rank advances the same
    state and keeps its own slice, so the state is identical on all ranks.

    The position is `state_dict()`: small, JSON-able, and `load_state_dict()` on a fresh stream
    over the same data continues with exactly the batches the saved one would have served.
    """

    state_version = STATE_VERSION

    def __init__(
        self,
        blocks: list[torch.Tensor],
        weights: list[float] | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fingerprint: str | None = None,
    ):
        if not blocks:
            raise MinimaError("no training data: the stream needs at least one source")
        weights = [1.0] * len(blocks) if weights is None else [float(w) for w in weights]
        if len(weights) != len(blocks):
            raise MinimaError(f"{len(weights)} weights for {len(blocks)} sources")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise MinimaError(f"source weights must be positive, got {weights}")
        if any(b.ndim != 2 or len(b) == 0 or b.shape[1] != blocks[0].shape[1] for b in blocks):
            raise MinimaError("every source needs at least one block, all of the same seq_len")
        if batch_size < 1:
            raise MinimaError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise MinimaError(f"rank {rank} is not in a world of size {world_size}")
        _check_seed(seed)
        super().__init__(seed=seed,
                         fingerprint=fingerprint or _blocks_fingerprint(blocks, weights, seed))
        self.blocks, self.weights = blocks, weights
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        cumulative = np.cumsum(weights)
        self._cumulative = cumulative / cumulative[-1]
        self.epochs = [0] * len(blocks)
        self.indices = [0] * len(blocks)
        # each source's order for its current epoch, drawn on first use (a resumed stream draws
        # only the epochs it is at, and never holds two orders of one source)
        self._orders: list[np.ndarray | None] = [None] * len(blocks)
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, MIX])))
        self.blocks_served = 0
        self.batches_served = 0
        self.last_picks: list[tuple[int, int]] = []

    def __next__(self) -> torch.Tensor:
        n = self.batch_size * self.world_size
        draws = np.searchsorted(self._cumulative, self._rng.random(n), side="right")
        picks = [self._take(min(int(i), len(self.blocks) - 1)) for i in draws]
        mine = picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.last_picks = mine  # (source, row) of each block: keys into an offline teacher cache
        self.blocks_served += n
        self.batches_served += 1
        return torch.stack([self.blocks[source][row] for source, row in mine]).long()

    def _take(self, source: int) -> tuple[int, int]:
        """The next block of `source`, starting its next epoch (a new order) when exhausted."""
        if self.indices[source] == len(self.blocks[source]):
            self.epochs[source] += 1
            self.indices[source] = 0
            self._orders[source] = None  # freed before the next is drawn
        order = self._orders[source]
        if order is None:
            order = self._orders[source] = shuffle_order(
                len(self.blocks[source]), self.seed, source, self.epochs[source]
            )
        row = int(order[self.indices[source]])
        self.indices[source] += 1
        return source, row

    def position(self) -> dict[str, Any]:
        """Each source's epoch and index, and the mixing draws' PCG64 state (two Python ints of
        128 bits)."""
        rng = self._rng.bit_generator.state
        return {
            "epochs": list(self.epochs),
            "indices": list(self.indices),
            "rng": {**rng["state"], "has_uint32": rng["has_uint32"], "uinteger": rng["uinteger"]},
            "blocks_served": self.blocks_served,
            "batches_served": self.batches_served,
        }

    def restore(self, state: dict[str, Any]) -> None:
        epochs = [int(e) for e in state["epochs"]]
        indices = [int(i) for i in state["indices"]]
        rng = state["rng"]
        rng_state = {
            "bit_generator": "PCG64",
            "state": {"state": int(rng["state"]), "inc": int(rng["inc"])},
            "has_uint32": int(rng["has_uint32"]),
            "uinteger": int(rng["uinteger"]),
        }
        blocks_served = int(state["blocks_served"])
        batches_served = int(state["batches_served"])
        sizes = [len(b) for b in self.blocks]
        if len(epochs) != len(sizes) or len(indices) != len(sizes) or any(
            e < 0 or not 0 <= i <= n for e, i, n in zip(epochs, indices, sizes, strict=True)
        ):
            raise MinimaError("the saved data position does not fit this data (data mismatch)")
        self._rng.bit_generator.state = rng_state
        self.epochs, self.indices = epochs, indices
        self._orders = [None] * len(sizes)  # redrawn from (seed, source, epoch) on first use
        self.blocks_served, self.batches_served = blocks_served, batches_served


def _blocks_fingerprint(blocks: list[torch.Tensor], weights: list[float], seed: int) -> str:
    """A fingerprint from the blocks themselves, for streams built without `prepare_data`."""
    digest = hashlib.sha256(json.dumps({"weights": weights, "seed": seed}).encode())
    for b in blocks:
        digest.update(f"{b.dtype}{tuple(b.shape)}".encode())
        digest.update(b.contiguous().numpy().tobytes())
    return digest.hexdigest()
