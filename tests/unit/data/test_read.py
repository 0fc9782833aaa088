"""Tests for minima_cli.data: reading every source kind, every error path, packing, tokenizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minima_cli.data.pack import pack_documents
from minima_cli.data.read import read_documents
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.errors import MinimaError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- reading ---------------------------------------------------------------------------------


def test_txt_one_document_per_non_empty_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "first doc\n\n   \nsecond doc\r\nthird\n")
    assert read_documents(path) == ["first doc", "second doc", "third"]
    assert read_documents(str(path)) == ["first doc", "second doc", "third"]


def test_jsonl_with_custom_field_skips_blank_lines_and_empty_texts(tmp_path: Path) -> None:
    lines = [{"content": "alpha", "id": 1}, {"content": ""}, {"content": None}, {"content": "beta"}]
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert read_documents(path, text_field="content") == ["alpha", "beta"]


def test_json_list_columnar_and_json_lines(tmp_path: Path) -> None:
    records = write(tmp_path / "r.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    columnar = write(tmp_path / "c.json", json.dumps({"text": ["a", "b"], "id": [1, 2]}))
    lines = write(tmp_path / "l.json", '{"text": "a"}\n{"text": "b"}\n')
    for path in (records, columnar, lines):
        assert read_documents(path) == ["a", "b"], path.name


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["x y", "", "z"], "n": [1, 2, 3]}), path)
    assert read_documents(path) == ["x y", "z"]


def test_directory_reads_supported_files_sorted_and_recursively(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "from b\n")
    write(tmp_path / "a.jsonl", json.dumps({"text": "from a"}) + "\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.txt", "from sub/c\n")
    write(tmp_path / "notes.md", "ignored\n")
    (tmp_path / ".hidden").mkdir()
    write(tmp_path / ".hidden" / "x.txt", "ignored too\n")
    assert read_documents(tmp_path) == ["from a", "from b", "from sub/c"]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "./missing", "sub/dir/"])
def test_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MinimaError, match="not found"):
        read_documents(name)
    with pytest.raises(MinimaError, match="not found"):
        read_documents(tmp_path / name)


def test_a_named_markdown_file_is_plain_text(tmp_path: Path) -> None:
    assert read_documents(write(tmp_path / "README.md", "# minima\n\nscores and prunes\n")) == [
        "# minima", "scores and prunes"]


def test_unsupported_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "text\nhello\n")
    with pytest.raises(MinimaError, match=r"unsupported data file .*a\.csv"):
        read_documents(path)


def test_directory_without_data_files(tmp_path: Path) -> None:
    write(tmp_path / "readme.md", "nothing here\n")
    with pytest.raises(MinimaError, match="no .* files in directory"):
        read_documents(tmp_path)


def test_missing_text_field_names_field_and_fields_present(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"body": "x", "id": 3}\n')
    expected = r"a\.jsonl:2: no field 'text' \(fields present: body, id\)"
    with pytest.raises(MinimaError, match=expected):
        read_documents(path)
    path = write(tmp_path / "b.json", json.dumps([{"body": "x"}]))
    with pytest.raises(MinimaError, match=r"no field 'text' \(fields present: body\)"):
        read_documents(path)
    path = write(tmp_path / "c.json", json.dumps({"data": [{"text": "x"}]}))
    with pytest.raises(MinimaError, match=r"no list under field 'text' \(fields present: data\)"):
        read_documents(path)


def test_missing_parquet_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), path)
    with pytest.raises(MinimaError, match=r"no column 'text' \(columns present: body, n\)"):
        read_documents(path)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(MinimaError, match=r"a\.jsonl:3: malformed JSON"):
        read_documents(path)
    path = write(tmp_path / "b.json", '[\n{"text": "ok"},\n{"text": }\n]')
    with pytest.raises(MinimaError, match=r"b\.json:3: malformed JSON"):
        read_documents(path)


def test_non_object_record_and_non_string_text(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '["not", "an", "object"]\n')
    with pytest.raises(MinimaError, match=r"a\.jsonl:1: expected a JSON object, got list"):
        read_documents(path)
    path = write(tmp_path / "b.jsonl", '{"text": 42}\n')
    with pytest.raises(MinimaError, match=r"b\.jsonl:1: field 'text' is int, not a string"):
        read_documents(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.txt", ""), ("blank.txt", "\n  \n\t\n"), ("empty.jsonl", '{"text": " "}\n')],
)
def test_no_documents(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(MinimaError, match="no documents"):
        read_documents(path)


def test_hub_name_failure_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(name: str, split: str) -> None:
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MinimaError, match="not a local path") as info:
        read_documents("someone/no-such-dataset")
    assert "\n" not in str(info.value)
    assert "someone/no-such-dataset" in str(info.value)


def test_hub_name_reads_text_column(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    seen = {}

    def fake(name: str, split: str) -> datasets.Dataset:
        seen.update(name=name, split=split)
        return datasets.Dataset.from_dict({"text": ["hub doc", ""], "other": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert read_documents("owner/corpus") == ["hub doc"]
    assert seen == {"name": "owner/corpus", "split": "train"}
    with pytest.raises(MinimaError, match=r"no column 'body' \(columns present: text, other\)"):
        read_documents("owner/corpus", text_field="body")


# --- packing and tokenizing ------------------------------------------------------------------


def test_pack_documents_exact() -> None:
    docs = [[1, 2, 3], [4], [5, 6, 7, 8]]
    # Stream "1 2 3 E 4 E 5 6 7 8 E" (11 tokens): two blocks of 4, the tail "7 8 E" is dropped.
    blocks = pack_documents(docs, seq_len=4, eos_id=0)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6]]
    whole = pack_documents(docs, seq_len=11, eos_id=9)
    assert whole.tolist() == [[1, 2, 3, 9, 4, 9, 5, 6, 7, 8, 9]]
    assert pack_documents([[], [7]], seq_len=1, eos_id=0).tolist() == [[0], [7], [0]]


def test_pack_documents_too_little_data() -> None:
    with pytest.raises(MinimaError, match=r"11 tokens .* seq_len=12 needs 12"):
        pack_documents([[1, 2, 3], [4], [5, 6, 7, 8]], seq_len=12, eos_id=0)
    with pytest.raises(MinimaError, match="seq_len must be at least 1"):
        pack_documents([[1]], seq_len=0, eos_id=0)


def test_tokenize_documents_adds_no_special_tokens() -> None:
    from minima_cli.stages.tiny import train_tokenizer

    texts = ["the cat sat on the mat.", "one plus two is three."] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    ids = tokenize_documents(tokenizer, texts[:2])
    assert ids == [tokenizer.encode(t, add_special_tokens=False) for t in texts[:2]]
    assert all(tokenizer.eos_token_id not in doc for doc in ids)
    assert [tokenizer.decode(doc) for doc in ids] == texts[:2]
