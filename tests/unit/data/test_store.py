"""Tests for minima_cli.data.store (the token store) and the store side of data/streams.py: round
trips across shard boundaries (uint16 and uint32), resume of an interrupted build, blocks read
from the memory map equal to in-memory packing, stream purity and rank coverage, bounded
validation (`valid_tokens`) and the bad inputs of `minima tokenize`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import run_cli

from minima_cli.data.pack import held_out_by_tokens, pack_tokens
from minima_cli.data.read import read_documents
from minima_cli.data.sources import DataSource, parse_sources, tokenizer_fingerprint
from minima_cli.data.store import StoreBlocks, TokenStore, build_store
from minima_cli.data.streams import MixedBlockStream, prepare_data
from minima_cli.data.tiny_corpus import make_corpus
from minima_cli.data.tokenize import TokenizedSource, tokenize_documents
from minima_cli.errors import MinimaError
from minima_cli.stages.tiny import train_tokenizer

SEQ = 16


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus(240, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus: list[str]) -> Any:
    return train_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return path


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
    return path


def build(sources: str, tokenizer: Any, tok_dir: Path, output: Path, **kw: Any) -> TokenStore:
    build_store(parse_sources(sources), tokenizer, str(tok_dir), output,
                tokenizer_fp=tokenizer_fingerprint(tokenizer), **kw)
    return TokenStore(output)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "minima.json"}


def test_round_trip_across_shards_in_order(tmp_path: Path, corpus: list[str], tokenizer: Any,
                                           tok_dir: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = write_txt(tmp_path / "a.txt", corpus[:100])
    jsonl = write_jsonl(tmp_path / "b.jsonl", corpus[100:180], field="body")
    pq.write_table(pa.table({"body": corpus[180:]}), tmp_path / "c.parquet")
    spec = [{"path": str(txt)}, {"path": str(jsonl), "text_field": "body"},
            {"path": str(tmp_path / "c.parquet"), "text_field": "body"}]
    store = TokenStore(build_store(parse_sources(spec), tokenizer, str(tok_dir),
                                   tmp_path / "store", shard_tokens=500,
                                   tokenizer_fp=tokenizer_fingerprint(tokenizer)) and
                       tmp_path / "store")
    expected = tokenize_documents(tokenizer, read_documents(str(txt)) + corpus[100:])
    assert len(store) == len(expected) == len(corpus)
    assert len(store.manifest["shards"]) > 5 and store.dtype == np.uint16
    assert [store.document(i).tolist() for i in range(len(store))] == expected
    flat = np.concatenate([np.array(e) for e in expected])
    assert store.n_tokens == len(flat) == len(store.flat)
    assert np.array_equal(store.flat[:], flat)
    boundary = int(store.token_starts[1])  # a range across the first shard boundary
    assert np.array_equal(store.tokens(boundary - 7, boundary + 9), flat[boundary - 7:boundary + 9])
    assert store.flat[boundary] == flat[boundary] and store.flat[-1] == flat[-1]
    assert np.array_equal(store.lengths(), [len(e) for e in expected])
    longest = int(np.argmax(store.lengths()))  # a part of a document, clipped to its end
    for start, stop in ((0, 3), (5, 9), (len(expected[longest]) - 2, 10**6), (10**6, 10**6 + 1)):
        assert store.document_part(longest, start, stop).tolist() == \
            expected[longest][start:stop]
    # two worker processes give the same bytes as one process
    import minima_cli.data.store as store_module

    one = build(str(txt), tokenizer, tok_dir, tmp_path / "w1", shard_tokens=500)
    here: list[int] = []
    encode_here = store_module.encode_chunk
    monkeypatch.setattr(store_module, "encode_chunk",
                        lambda texts, *a: here.append(len(texts)) or encode_here(texts, *a))
    monkeypatch.setattr(store_module, "CHUNK_DOCUMENTS", 16)  # 7 chunks: the pool starts
    two = build(str(txt), tokenizer, tok_dir, tmp_path / "w2", workers=2, shard_tokens=500)
    assert here == [] and files_of(two.path) == files_of(one.path)
    # a source of one chunk is tokenised in this process: no pool to start for it
    monkeypatch.setattr(store_module, "CHUNK_DOCUMENTS", 512)
    build(str(txt), tokenizer, tok_dir, tmp_path / "w2b", workers=2, shard_tokens=500)
    assert here == [100]


class WideTokenizer:
    """The tokenizer with a vocabulary that does not fit uint16 (ids shifted past 65,535)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.eos_token_id = inner.eos_token_id
        self.backend_tokenizer = None

    def __len__(self) -> int:
        return 70_000

    def __call__(self, documents: list[str], add_special_tokens: bool = False) -> Any:
        ids = tokenize_documents(self.inner, documents)
        return {"input_ids": [[t + 65_000 for t in doc] for doc in ids]}


def test_uint32_store_round_trip(tmp_path: Path, corpus: list[str], tokenizer: Any,
                                 tok_dir: Path) -> None:
    txt = write_txt(tmp_path / "a.txt", corpus[:50])
    wide = WideTokenizer(tokenizer)
    build_store(parse_sources(str(txt)), wide, str(tok_dir), tmp_path / "s", tokenizer_fp="w",
                shard_tokens=300)
    store = TokenStore(tmp_path / "s")
    assert store.dtype == np.uint32
    expected = [[t + 65_000 for t in doc] for doc in tokenize_documents(tokenizer, corpus[:50])]
    assert [store.document(i).tolist() for i in range(len(store))] == expected
    assert (tmp_path / "s" / "tokens-00000.bin").stat().st_size == \
        4 * store.manifest["shards"][0]["tokens"]


def test_max_tokens_and_interrupted_build_resumes_byte_for_byte(
        tmp_path: Path, corpus: list[str], tokenizer: Any, tok_dir: Path) -> None:
    txt = write_txt(tmp_path / "a.txt", corpus)
    capped = build(str(txt), tokenizer, tok_dir, tmp_path / "capped", max_tokens=1234,
                   shard_tokens=400)
    assert capped.n_tokens == 1234
    whole = build(str(txt), tokenizer, tok_dir, tmp_path / "whole", shard_tokens=400)

    class Killed(BaseException):
        pass

    def die_after_three(entry: dict, totals: dict) -> None:
        if len(totals["shards"]) == 3:
            raise Killed

    with pytest.raises(Killed):
        build(str(txt), tokenizer, tok_dir, tmp_path / "resumed", shard_tokens=400,
              on_shard=die_after_three)
    partial = tmp_path / "resumed.tmp-build"
    assert not (tmp_path / "resumed").exists() and len(list(partial.glob("tokens-*"))) == 3
    seen: list[str] = []
    build(str(txt), tokenizer, tok_dir, tmp_path / "resumed", shard_tokens=400,
          on_shard=lambda entry, totals: seen.append(entry["tokens_file"]))
    assert seen[0] == "tokens-00003.bin"  # continued, not restarted
    assert files_of(tmp_path / "resumed") == files_of(whole.path)
    assert not partial.exists()


def test_store_blocks_equal_in_memory_packing(tmp_path: Path, corpus: list[str],
                                              tokenizer: Any, tok_dir: Path) -> None:
    txt = write_txt(tmp_path / "a.txt", corpus)
    store = build(str(txt), tokenizer, tok_dir, tmp_path / "s", shard_tokens=700)
    flat = TokenizedSource.of(tokenize_documents(tokenizer, read_documents(str(txt))))
    for held in ([], [0, 5, 6, 100, len(corpus) - 1], list(range(0, len(corpus), 7))):
        blocks = StoreBlocks(store, SEQ, 0, np.array(held, dtype=np.int64))
        train = np.setdiff1d(np.arange(len(corpus)), held)
        expected = pack_tokens(flat, train, SEQ, 0)
        assert blocks.shape == tuple(expected.shape)
        assert torch.equal(blocks[:], expected) and torch.equal(blocks[3], expected[3])
    # prepare_data on the store equals prepare_data on the text, split included
    for kw in ({"valid_fraction": 0.05}, {"valid_tokens": 5 * SEQ}):
        raw = prepare_data(str(txt), tokenizer, seq_len=SEQ, seed=3, **kw)
        mapped = prepare_data(str(store.path), tokenizer, seq_len=SEQ, seed=3, **kw)
        assert isinstance(mapped.train[0], StoreBlocks)
        assert torch.equal(mapped.train[0][:], raw.train[0][:]) and torch.equal(mapped.valid,
                                                                              raw.valid)


def test_stream_blocks_are_pure_and_rank_slices_cover_each_block_once(
        tmp_path: Path, corpus: list[str], tokenizer: Any, tok_dir: Path) -> None:
    store = build(str(write_txt(tmp_path / "a.txt", corpus)), tokenizer, tok_dir,
                  tmp_path / "s", shard_tokens=700)

    def stream(rank: int, world: int) -> MixedBlockStream:
        prepared = prepare_data(str(store.path), tokenizer, seq_len=SEQ, seed=4)
        return prepared.stream(2, rank=rank, world_size=world)

    world = 3
    streams = [stream(r, world) for r in range(world)]
    n = len(streams[0].blocks[0])
    batches = n // (2 * world)
    served = [[] for _ in range(world)]
    for r, s in enumerate(streams):
        for _ in range(batches):
            next(s)
            served[r] += [row for _, row in s.last_picks]
    everything = sum(served, [])
    assert len(set(everything)) == len(everything) == batches * 2 * world  # once each per epoch
    assert all(set(a).isdisjoint(b) for i, a in enumerate(served) for b in served[i + 1:])
    # a fresh stream (new memory maps) restored at a position serves the same blocks
    first = stream(1, world)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    later = [next(first) for _ in range(batches + 3)]  # into the next epoch
    again = stream(1, world)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(later, (next(again) for _ in later),
                                                  strict=True))


def test_valid_tokens_is_independent_of_corpus_size(tmp_path: Path, tokenizer: Any) -> None:
    small = write_txt(tmp_path / "small.txt", make_corpus(100, seed=1))
    large = write_txt(tmp_path / "large.txt", make_corpus(800, seed=1))
    budget = 12 * SEQ + 5
    sizes = []
    for path in (small, large):
        prepared = prepare_data(str(path), tokenizer, seq_len=SEQ, seed=0, valid_tokens=budget,
                                valid_fraction=0.05)
        sizes.append(prepared.valid.shape)
        assert prepared.summary()["valid_blocks"] == budget // SEQ
    assert sizes[0] == sizes[1] == (budget // SEQ, SEQ)
    mix = prepare_data(f"{small}:0.5,{large}:0.5", tokenizer, seq_len=SEQ, valid_tokens=budget)
    assert mix.valid.shape == (budget // SEQ, SEQ)
    # the choice is a pure function of the seed; the fingerprint records the budget
    a = held_out_by_tokens(lambda i: 10, 1000, 200, seed=1)
    assert np.array_equal(a, held_out_by_tokens(lambda i: 10, 1000, 200, seed=1))
    assert len(a) == 19 and not np.array_equal(a, held_out_by_tokens(lambda i: 10, 1000, 200,
                                                                      seed=2))
    plain = prepare_data(str(small), tokenizer, seq_len=SEQ, valid_fraction=0.05)
    assert plain.fingerprint != prepare_data(str(small), tokenizer, seq_len=SEQ,
                                             valid_tokens=budget).fingerprint
    with pytest.raises(MinimaError, match="nothing is left for training"):
        prepare_data(str(small), tokenizer, seq_len=SEQ, valid_tokens=10**7)
    with pytest.raises(MinimaError, match="less than one block"):
        prepare_data(str(small), tokenizer, seq_len=SEQ, valid_tokens=SEQ - 1)


def test_store_refused_for_other_tokenizer_truncation_or_missing_manifest(
        tmp_path: Path, corpus: list[str], tokenizer: Any, tok_dir: Path) -> None:
    store = build(str(write_txt(tmp_path / "a.txt", corpus)), tokenizer, tok_dir,
                  tmp_path / "s", shard_tokens=700)
    other = train_tokenizer(corpus, vocab_size=280)
    with pytest.raises(MinimaError, match="another tokenizer"):
        prepare_data(str(store.path), other, seq_len=SEQ)
    shard = store.path / "tokens-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(MinimaError, match="tokens-00001.bin is truncated"):
        prepare_data(str(store.path), tokenizer, seq_len=SEQ)
    (store.path / "store.json").unlink()
    with pytest.raises(MinimaError, match="no store.json"):
        prepare_data(str(store.path), tokenizer, seq_len=SEQ)


def test_bad_stores_exit_2_with_one_line_and_nothing_written(
        tmp_path: Path, corpus: list[str], tokenizer: Any, tok_dir: Path, tiny_world: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    teacher = tiny_world / "teacher"
    good = tmp_path / "good"
    code, _, err = run_cli(["tokenize", "--data", tiny_world / "data" / "train.txt",
                            "--tokenizer", teacher, "-o", good, "--shard-tokens", "2000", "-q"],
                           capsys)
    assert code == 0, err
    other = build(str(write_txt(tmp_path / "a.txt", corpus)), tokenizer, tok_dir,
                  tmp_path / "other")  # made with another tokenizer than the teacher's
    truncated, unnamed = tmp_path / "truncated", tmp_path / "unnamed"
    shutil.copytree(good, truncated)
    shard = truncated / "tokens-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    shutil.copytree(good, unnamed)
    (unnamed / "store.json").unlink()
    for store, message in ((other.path, "another tokenizer"),
                           (truncated, "tokens-00001.bin is truncated"),
                           (unnamed, "no store.json")):
        out = tmp_path / "student"
        code, _, err = run_cli(["distill", "-t", teacher, "-s", teacher, "-d", store, "-o", out,
                                "--seq-len", "32", "--max-steps", "1", "-q"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (store, err)
        assert message in lines[0], (store, err)
        assert not [p.name for p in tmp_path.glob("student*")], store


def test_tokenize_cli_and_bad_inputs(tmp_path: Path, corpus: list[str], tok_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    txt = write_txt(tmp_path / "a.txt", corpus)
    out = tmp_path / "store"
    code, _, err = run_cli(["tokenize", "--data", txt, "--tokenizer", tok_dir, "-o", out,
                            "--workers", "2", "--shard-tokens", "1000"], capsys)
    assert code == 0, err
    assert TokenStore(out).n_documents == len(corpus)
    manifest = json.loads((out / "minima.json").read_text())
    assert manifest["stage"] == "tokenize" and manifest["metrics"]["documents"] == len(corpus)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blank = write_jsonl(tmp_path / "blank.jsonl", ["  ", ""])
    other_field = write_jsonl(tmp_path / "f.jsonl", corpus[:3], field="body")
    bad = [
        (["--data", empty], "no documents"),
        (["--data", blank], "no documents"),
        (["--data", other_field], "no field 'text'"),
        (["--data", txt, "--workers", "0"], "workers"),
        (["--data", txt, "--max-tokens", "-1"], "max-tokens"),
        (["--data", "someone/no-such-dataset-xyz"], "the hub is unreachable"),
        (["--data", tmp_path / "missing.txt"], "not found"),
    ]
    for args, message in bad:
        target = tmp_path / "bad"
        code, _, err = run_cli(["tokenize", "--tokenizer", tok_dir, "-o", target, *args], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert message in lines[0], (args, err)
        assert not target.exists() and not (tmp_path / "bad.tmp-build").exists()
    code, _, err = run_cli(["tokenize", "--data", txt, "--tokenizer", tok_dir, "-o", out],
                           capsys)
    assert code == 2 and "exists" in err


def test_raw_sources_unchanged_by_source_kind() -> None:
    # A DataSource of a store and of text parse alike; the store is recognised by its manifest.
    assert parse_sources("some/dir:0.5") == [DataSource("some/dir", 0.5)]


def test_dry_run_lines_for_a_store_a_raw_source_and_a_hub_name(
        tmp_path: Path, corpus: list[str], tokenizer: Any, tok_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from minima_cli.data.store import describe_source, measured_rate, record_rate

    monkeypatch.setenv("MINIMA_RATE_CACHE", str(tmp_path / "rates.json"))
    txt = write_txt(tmp_path / "a.txt", corpus)
    store = build(str(txt), tokenizer, tok_dir, tmp_path / "s")
    line = describe_source(DataSource(str(store.path)))
    assert "token store" in line and "GB on disk" in line and "tokens" in line
    assert "no tokenisation rate measured" in describe_source(DataSource(str(txt)))
    record_rate(4_000_000, 2.0, 2)  # 1M chars/s per worker, kept per machine
    assert measured_rate() == pytest.approx(1e6)
    assert "about 1 s at the 1 M chars/s measured here" in describe_source(DataSource(str(txt)))
    assert "hub dataset" in describe_source(DataSource("someone/corpus"))
