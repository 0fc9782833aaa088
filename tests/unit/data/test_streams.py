"""Tests for the training-data side of minima_cli.data: sources, the run's token cache (raw text
tokenised into a store), the validation split, packing, weighted mixing and the exactly
resumable `MixedBlockStream`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import minima_cli.data.store as store_module
import minima_cli.data.tokenize as data
from minima_cli.data.pack import pack_documents, pack_tokens, split_documents
from minima_cli.data.read import read_documents
from minima_cli.data.sources import (
    DataSource,
    parse_sources,
    source_fingerprint,
    tokenizer_fingerprint,
)
from minima_cli.data.store import StoreBlocks, is_store, source_store
from minima_cli.data.streams import MixedBlockStream, prepare_data, shuffle_order
from minima_cli.data.tiny_corpus import make_corpus
from minima_cli.data.tokenize import TokenizedSource, tokenize_documents
from minima_cli.errors import MinimaError
from minima_cli.stages.tiny import train_tokenizer

SEQ = 16


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus(200, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus: list[str]) -> Any:
    return train_tokenizer(corpus, vocab_size=300)


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture
def two_sources(tmp_path: Path, corpus: list[str]) -> tuple[Path, Path]:
    a = write_txt(tmp_path / "a.txt", corpus[:120])
    return a, write_jsonl(tmp_path / "b.jsonl", corpus[120:])


def count_tokenizer_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def counting(tokenizer: Any, documents: list[str]) -> list[list[int]]:
        calls.append(len(documents))
        return tokenize_documents(tokenizer, documents)

    monkeypatch.setattr(data, "tokenize_documents", counting)
    return calls


def take(stream: MixedBlockStream, n: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(n)]


# --- parse_sources ---------------------------------------------------------------------------


def test_parse_sources_cli_strings_and_lists() -> None:
    assert parse_sources("a.jsonl") == [DataSource("a.jsonl")]
    assert parse_sources(" a.txt:0.7, owner/name:0.3 ", text_field="body") == [
        DataSource("a.txt", 0.7, "body"),
        DataSource("owner/name", 0.3, "body"),
    ]
    # A colon not followed by a number belongs to the path.
    assert parse_sources(r"C:\data\x.txt:2") == [DataSource(r"C:\data\x.txt", 2.0)]
    assert parse_sources(r"C:\data\x.txt") == [DataSource(r"C:\data\x.txt")]
    spec = [
        {"path": "a.jsonl", "weight": 3, "text_field": "content"},
        {"path": "b.txt"},
        "c.txt:0.5",
        DataSource("d.txt", 2.0, "t"),
    ]
    assert parse_sources(spec, text_field="body") == [
        DataSource("a.jsonl", 3.0, "content"),
        DataSource("b.txt", 1.0, "body"),
        DataSource("c.txt", 0.5, "body"),
        DataSource("d.txt", 2.0, "t"),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no data sources"),
        ([], "no data sources"),
        ("a.txt:0", "must be positive, got 0.0"),
        ("a.txt:0.7,b.txt:-1", "b.txt must be positive"),
        ("a.txt:nan", "must be positive"),
        ("a.txt,,b.txt", "empty entry"),
        ([{"path": "a.txt", "wieght": 2}], "unknown key wieght"),
        ([{"weight": 2}], "needs a 'path'"),
        ([{"path": "a.txt", "weight": "0.5"}], "must be a number"),
        ([{"path": "a.txt", "weight": True}], "must be a number"),
        ([{"path": "a.txt", "weight": 0}], "must be positive"),
        ([{"path": "a.txt", "text_field": ""}], "text_field"),
        ([3], "must be a string or a mapping"),
        (42, "must be a string or a list"),
    ],
)
def test_parse_sources_errors(spec: Any, message: str) -> None:
    with pytest.raises(MinimaError, match=message) as info:
        parse_sources(spec)
    assert "\n" not in str(info.value)


# --- the run's token cache (raw sources -> a store, data/store.py: source_store) ------------


def reference_blocks(tokenizer: Any, path: Path, train_docs: np.ndarray | None = None
                     ) -> torch.Tensor:
    """The blocks the in-memory path (read_documents -> flat tokens -> pack) made."""
    flat = TokenizedSource.of(tokenize_documents(tokenizer, read_documents(str(path))))
    docs = np.arange(flat.n_documents) if train_docs is None else train_docs
    return pack_tokens(flat, docs, SEQ, tokenizer.eos_token_id).long()


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name.split("-")[0] + ("" if is_store(p) else "?") for p in cache.iterdir())


def test_cache_miss_then_hit_without_tokenizing(
    tmp_path: Path, corpus: list[str], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_txt(tmp_path / "a.txt", corpus)
    calls = count_tokenizer_calls(monkeypatch)
    first = prepare_data(str(path), tokenizer, seq_len=SEQ, cache_dir=tmp_path / "cache")
    assert sum(calls) == len(corpus)
    assert cache_entries(tmp_path / "cache") == ["store"]  # a whole store, no build left over
    assert isinstance(first.train[0], StoreBlocks)
    calls.clear()
    second = prepare_data(str(path), tokenizer, seq_len=SEQ, cache_dir=tmp_path / "cache")
    assert calls == []
    assert torch.equal(second.train[0][:], first.train[0][:])
    assert torch.equal(first.train[0][:].long(), reference_blocks(tokenizer, path))
    # without a cache: a temporary store that lives as long as the data
    nocache = prepare_data(str(path), tokenizer, seq_len=SEQ)
    assert torch.equal(nocache.train[0][:], first.train[0][:])


def test_cache_invalidated_by_content_field_and_tokenizer(
    tmp_path: Path, corpus: list[str], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    path = write_jsonl(tmp_path / "a.jsonl", corpus[:50])
    calls = count_tokenizer_calls(monkeypatch)

    def documents(text_field: str = "text", tok: Any = tokenizer) -> int:
        source = DataSource(str(path), text_field=text_field)
        store = source_store(source, tok, cache, content=source_fingerprint(source),
                             tokenizer_fp=tokenizer_fingerprint(tok))
        return len(store)

    documents()
    write_jsonl(path, corpus[:49])  # same path, new content
    assert documents() == 49
    path.write_text("".join(json.dumps({"text": d, "t2": d[:5]}) + "\n" for d in corpus[:49]))
    documents("t2")
    other = train_tokenizer(corpus, vocab_size=280)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    documents("t2", other)
    assert len(calls) == 4  # every change was a miss
    assert cache_entries(cache) == ["store"] * 4


def test_runtime_truncation_changes_neither_tokens_nor_fingerprint(
    corpus: list[str], tokenizer: Any
) -> None:
    before = tokenizer_fingerprint(tokenizer), tokenize_documents(tokenizer, corpus[:3])
    # transformers leaves these settings on the backend after the call returns.
    tokenizer(corpus[:2], truncation=True, max_length=3, padding="max_length")
    after = tokenizer_fingerprint(tokenizer), tokenize_documents(tokenizer, corpus[:3])
    assert after == before
    assert min(len(doc) for doc in after[1]) > 3


def test_killed_cache_build_leaves_no_store_and_damage_is_rebuilt(
    tmp_path: Path, corpus: list[str], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_txt(tmp_path / "a.txt", corpus[:30])
    cache = tmp_path / "cache"

    def killed(*args: Any) -> Any:
        raise RuntimeError("killed while tokenising")

    monkeypatch.setattr(store_module, "encode_chunk", killed)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_data(str(path), tokenizer, seq_len=SEQ, cache_dir=cache)
    assert cache_entries(cache) == ["store?"]  # only the build directory, never a store
    monkeypatch.undo()
    good = prepare_data(str(path), tokenizer, seq_len=SEQ, cache_dir=cache).train[0][:]
    assert cache_entries(cache) == ["store"]
    # A damaged entry (a truncated shard) is a miss and is rebuilt, never trusted.
    (entry,) = cache.iterdir()
    shard = entry / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    calls = count_tokenizer_calls(monkeypatch)
    again = prepare_data(str(path), tokenizer, seq_len=SEQ, cache_dir=cache).train[0][:]
    assert calls and torch.equal(again, good) and cache_entries(cache) == ["store"]


def test_cached_store_serves_the_in_memory_blocks_for_every_format(
    tmp_path: Path, corpus: list[str], tokenizer: Any
) -> None:
    # What read_documents accepts is read alike (a columnar .json, CRLF and blank lines,
    # parquet with nulls, a directory), so raw runs keep their blocks, split and fingerprint.
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "a.txt").write_bytes(("\r\n".join(corpus[:40]) + "\r\n\r\n  \n").encode())
    (folder / "b.json").write_text(json.dumps({"text": corpus[40:60] + ["  "]}))
    pq.write_table(pa.table({"text": [*corpus[60:80], None]}), folder / "c.parquet")
    (folder / "notes.arrow").write_bytes(b"not read: not a data file of read_documents")
    for source in (folder, folder / "b.json"):
        prepared = prepare_data(str(source), tokenizer, seq_len=SEQ, seed=1, valid_documents=3,
                                cache_dir=tmp_path / "cache")
        n = len(read_documents(str(source)))
        train, _ = split_documents(n, seed=1, valid_documents=3)
        assert torch.equal(prepared.train[0][:].long(),
                           reference_blocks(tokenizer, source, train)), source


# --- packing and the validation split --------------------------------------------------------


def test_pack_tokens_equals_pack_documents() -> None:
    docs = [[5, 6, 7], [], [8], [9, 10, 11, 12, 13], [14, 15]]
    lengths = [len(d) for d in docs]
    flat = TokenizedSource(
        np.array([t for d in docs for t in d], dtype=np.int32),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )
    for seq_len in (1, 3, 4, 16):  # 11 tokens + 5 EOS
        expected = pack_documents(docs, seq_len, eos_id=0)
        assert torch.equal(pack_tokens(flat, None, seq_len, 0).long(), expected)
    subset = np.array([3, 0, 4])  # any order in, source order out
    expected = pack_documents([docs[0], docs[3], docs[4]], 2, eos_id=1)
    assert torch.equal(pack_tokens(flat, subset, 2, 1).long(), expected)
    with pytest.raises(MinimaError, match=r"16 tokens .* seq_len=17"):
        pack_tokens(flat, None, 17, 0)


def test_split_is_deterministic_disjoint_and_sized() -> None:
    train, valid = split_documents(100, seed=3, valid_fraction=0.1)
    assert len(valid) == 10 and len(train) == 90
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(100))
    again = split_documents(100, seed=3, valid_fraction=0.1)
    assert np.array_equal(again[1], valid)
    assert not np.array_equal(split_documents(100, seed=4, valid_fraction=0.1)[1], valid)
    other_source = split_documents(100, seed=3, source_index=1, valid_fraction=0.1)
    assert not np.array_equal(other_source[1], valid)
    assert len(split_documents(100, seed=0, valid_documents=7)[1]) == 7
    assert len(split_documents(100, seed=0, valid_fraction=0.001)[1]) == 1  # at least one
    assert len(split_documents(5, seed=0)[1]) == 0
    with pytest.raises(MinimaError, match="nothing is left for training"):
        split_documents(3, seed=0, valid_documents=3)
    with pytest.raises(MinimaError, match="nothing is left for training"):
        split_documents(1, seed=0, valid_fraction=0.5)
    with pytest.raises(MinimaError, match="not both"):
        split_documents(10, seed=0, valid_fraction=0.1, valid_documents=1)
    with pytest.raises(MinimaError, match=r"valid_fraction must be in \[0, 1\)"):
        split_documents(10, seed=0, valid_fraction=1.0)


def test_prepare_data_holds_out_documents(
    two_sources: tuple[Path, Path], corpus: list[str], tokenizer: Any
) -> None:
    a, b = two_sources
    prepared = prepare_data([str(a), str(b)], tokenizer, seq_len=SEQ, seed=2, valid_documents=6)
    eos = tokenizer.eos_token_id
    train_ids, valid_ids = [], []
    for i, docs in enumerate((corpus[:120], corpus[120:])):
        ids = tokenize_documents(tokenizer, docs)
        train, valid = split_documents(len(docs), seed=2, source_index=i, valid_documents=6)
        expected = pack_documents([ids[j] for j in train], SEQ, eos)
        assert torch.equal(prepared.train[i][:].long(), expected)
        train_ids += [ids[j] for j in train]
        valid_ids += [ids[j] for j in valid]
    assert torch.equal(prepared.valid, pack_documents(valid_ids, SEQ, eos))
    assert prepared.valid.dtype == torch.int64
    held_out = {tuple(d) for d in valid_ids}
    assert held_out and held_out.isdisjoint(tuple(d) for d in train_ids)
    assert prepared.summary()["valid_blocks"] == len(prepared.valid)
    again = prepare_data([str(a), str(b)], tokenizer, seq_len=SEQ, seed=2, valid_documents=6)
    assert torch.equal(again.valid, prepared.valid)
    assert again.fingerprint == prepared.fingerprint
    no_split = prepare_data(str(a), tokenizer, seq_len=SEQ)
    assert no_split.valid.shape == (0, SEQ)


def test_prepare_data_errors(tmp_path: Path, corpus: list[str], tokenizer: Any) -> None:
    empty = write_txt(tmp_path / "empty.txt", [""])
    with pytest.raises(MinimaError, match="no documents"):
        prepare_data(str(empty), tokenizer, seq_len=SEQ)
    other_field = write_jsonl(tmp_path / "body.jsonl", corpus[:5], field="body")
    with pytest.raises(MinimaError, match=r"no field 'text' \(fields present: body\)"):
        prepare_data(str(other_field), tokenizer, seq_len=SEQ)
    tiny = write_txt(tmp_path / "tiny.txt", ["a b"])
    with pytest.raises(MinimaError, match=r"tiny\.txt: not enough data to pack"):
        prepare_data(f"{write_txt(tmp_path / 'ok.txt', corpus)},{tiny}", tokenizer, seq_len=SEQ)
    with pytest.raises(MinimaError, match=r"one\.txt: the validation split .* nothing is left"):
        prepare_data(str(write_txt(tmp_path / "one.txt", corpus[:1])), tokenizer, seq_len=SEQ,
                     valid_fraction=0.5)
    few = write_txt(tmp_path / "few.txt", corpus[:20])
    with pytest.raises(MinimaError, match="validation split has .* raise valid_fraction"):
        prepare_data(str(few), tokenizer, seq_len=200, valid_documents=1)
    with pytest.raises(MinimaError, match="not found"):
        prepare_data(str(tmp_path / "missing.txt"), tokenizer, seq_len=SEQ)
    with pytest.raises(MinimaError, match="seed must be a non-negative integer"):
        prepare_data(str(few), tokenizer, seq_len=SEQ, seed=-1)


# --- the mixed block stream ------------------------------------------------------------------


def test_single_source_is_packed_blocks_shuffled_by_seed(
    tmp_path: Path, corpus: list[str], tokenizer: Any
) -> None:
    path = write_txt(tmp_path / "a.txt", corpus[:40])
    blocks = pack_documents(tokenize_documents(tokenizer, corpus[:40]), SEQ, tokenizer.eos_token_id)
    n = len(blocks)
    stream = prepare_data(str(path), tokenizer, seq_len=SEQ, seed=5).stream(batch_size=4)
    served = torch.cat(take(stream, (2 * n + 7) // 4 + 1))
    expected = torch.cat([blocks[shuffle_order(n, 5, 0, epoch)] for epoch in range(3)])
    assert torch.equal(served, expected[: len(served)])
    assert stream.epochs == [2]
    assert not np.array_equal(shuffle_order(n, 5, 0, 0), shuffle_order(n, 5, 0, 1))


def test_mixing_follows_weights_and_reshuffles_each_epoch() -> None:
    a = torch.arange(50 * 4).view(50, 4)  # rows of a are < 200, rows of b >= 1000
    b = torch.arange(1000, 1000 + 30 * 4).view(30, 4)
    stream = MixedBlockStream([a, b], [0.7, 0.3], batch_size=100, seed=0)
    rows = torch.cat(take(stream, 200))
    from_a = rows[:, 0] < 1000
    assert abs(from_a.float().mean().item() - 0.7) < 0.015
    a_rows = (rows[from_a][:, 0] // 4).tolist()
    for epoch in range(3):  # each epoch of a serves every block once, in a new order
        assert sorted(a_rows[50 * epoch : 50 * (epoch + 1)]) == list(range(50))
    assert a_rows[:50] != a_rows[50:100]
    assert stream.epochs[0] >= 3 and stream.epochs[1] >= 3
    assert stream.blocks_served == 20000 and stream.batches_served == 200


def test_stream_is_deterministic_by_seed_and_independent_of_batch_layout() -> None:
    a, b = torch.arange(40).view(10, 4), torch.arange(100, 128).view(7, 4)

    def rows(seed: int, batch_size: int, batches: int, **kw: int) -> torch.Tensor:
        stream = MixedBlockStream([a, b], [2.0, 1.0], batch_size=batch_size, seed=seed, **kw)
        return torch.cat(take(stream, batches))

    assert torch.equal(rows(1, 4, 10), rows(1, 4, 10))
    assert not torch.equal(rows(1, 4, 10), rows(2, 4, 10))
    assert torch.equal(rows(1, 4, 10), rows(1, 8, 5))  # the block sequence ignores the batch size
    # Ranks take consecutive slices of each global batch: together they are the one-rank stream.
    r0 = rows(1, 2, 10, rank=0, world_size=2).view(10, 2, 4)
    r1 = rows(1, 2, 10, rank=1, world_size=2).view(10, 2, 4)
    assert torch.equal(torch.cat([r0, r1], dim=1).reshape(-1, 4), rows(1, 4, 10))


def test_exact_resume_from_json_state(
    two_sources: tuple[Path, Path], tokenizer: Any, tmp_path: Path
) -> None:
    a, b = two_sources
    spec = f"{a}:0.7,{b}:0.3"

    def fresh() -> MixedBlockStream:
        return prepare_data(spec, tokenizer, seq_len=64, seed=7, valid_fraction=0.05,
                            cache_dir=tmp_path / "cache").stream(batch_size=16)

    uninterrupted = fresh()
    take(uninterrupted, 30)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    assert state["batches_served"] == 30 and state["blocks_served"] == 480
    expected = take(uninterrupted, 40)
    assert min(uninterrupted.epochs) >= 1  # the resumed part crosses epochs of both sources

    resumed = fresh()
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 40), expected, strict=True))
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_resume_refuses_other_data(
    two_sources: tuple[Path, Path], tokenizer: Any, tmp_path: Path
) -> None:
    a, b = two_sources
    base = {"tokenizer": tokenizer, "seq_len": SEQ, "seed": 0}
    prepared = prepare_data(f"{a}:0.7,{b}:0.3", **base)
    stream = prepared.stream(batch_size=2)
    next(stream)
    state = stream.state_dict()
    variants = [
        prepare_data(f"{a}:0.6,{b}:0.4", **base),
        prepare_data(f"{a}:0.7,{b}:0.3", **{**base, "seed": 1}),
        prepare_data(f"{a}:0.7,{b}:0.3", **{**base, "seq_len": SEQ + 1}),
        prepare_data(f"{a}:0.7,{b}:0.3", **base, valid_documents=2),
        prepare_data(f"{b}:0.7,{a}:0.3", **base),
    ]
    for other in variants:
        assert other.fingerprint != prepared.fingerprint
        with pytest.raises(MinimaError, match="data mismatch"):
            other.stream(batch_size=2).load_state_dict(state)
    # Moving a file keeps the content, so the run stays resumable.
    moved = a.rename(tmp_path / "moved.txt")
    same = prepare_data(f"{moved}:0.7,{b}:0.3", **base)
    assert same.fingerprint == prepared.fingerprint
    same.stream(batch_size=2).load_state_dict(state)
    with pytest.raises(MinimaError, match="malformed data position"):
        same.stream(batch_size=2).load_state_dict({k: v for k, v in state.items() if k != "rng"})
    with pytest.raises(MinimaError, match="does not fit"):
        same.stream(batch_size=2).load_state_dict({**state, "indices": [10**9, 0]})
    with pytest.raises(MinimaError, match="unsupported data position"):
        same.stream(batch_size=2).load_state_dict({**state, "version": 99})


def test_stream_argument_errors() -> None:
    a = torch.zeros(3, 4, dtype=torch.long)
    for kwargs, message in [
        ({"blocks": []}, "at least one source"),
        ({"weights": [1.0, 2.0]}, "2 weights for 1 sources"),
        ({"weights": [0.0]}, "must be positive"),
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"rank": 2, "world_size": 2}, "rank 2 is not in a world of size 2"),
        ({"blocks": [a, torch.zeros(2, 5, dtype=torch.long)]}, "same seq_len"),
        ({"blocks": [torch.zeros(0, 4, dtype=torch.long)]}, "at least one block"),
    ]:
        args = {"blocks": [a], "weights": None, "batch_size": 2, **kwargs}
        with pytest.raises(MinimaError, match=message):
            MixedBlockStream(args.pop("blocks"), args.pop("weights"), **args)
