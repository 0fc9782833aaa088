"""Tests for `minima eval`: perplexity against a hand computation, multiple
choice against lm-evaluation-harness on the same local task, generation, task specs, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_model, tiny_random_model

from minima_cli.data.tiny_corpus import make_corpus
from minima_cli.errors import MinimaError
from minima_cli.evaluation.choice import (
    McItem,
    continuation_logliks,
    encode_pair,
    mc_choice_texts,
    mc_context,
    mc_predictions,
    mc_requests,
    mc_shots,
    read_mc,
    score_mc,
)
from minima_cli.evaluation.generation import GenItem, generate, match, read_gen, stop_token_ids
from minima_cli.evaluation.harness import lm_eval_task
from minima_cli.evaluation.perplexity import document_stream, perplexity_windows, strided_nll
from minima_cli.evaluation.tasks import TaskSpec, parse_task
from minima_cli.runtime import torch_threads
from minima_cli.stages.configs import EvalConfig
from minima_cli.stages.evaluate import compare, eval_mc, table_rows
from minima_cli.stages.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_corpus(60, seed=0), vocab_size=300, model_max_length=128)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_random_model(vocab=len(tokenizer), layers=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second OpenMP thread only spins against the other jobs on the machine."""
    with torch_threads(1):
        yield


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- perplexity ---------------------------------------------------------------------------------


def test_windows_by_example() -> None:
    # independent chunks: each chunk's first token has no context and is not scored
    assert perplexity_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # stride 2: every token after the first scored once, with >= 2 tokens of context
    assert perplexity_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert perplexity_windows(3, 8, 4) == [(0, 3, 1)]
    assert perplexity_windows(1, 8, 4) == []


@pytest.mark.parametrize("n", [2, 7, 33])
@pytest.mark.parametrize(("length", "stride"), [(2, 1), (5, 1), (5, 3), (5, 4), (5, 5), (8, 8)])
def test_windows_score_each_token_once(n: int, length: int, stride: int) -> None:
    scored = []
    for begin, end, first in perplexity_windows(n, length, stride):
        assert end - begin <= length and begin < first < end <= n
        assert begin % stride == 0
        scored += range(first, end)
    assert len(scored) == len(set(scored))
    if stride < length:
        assert scored == list(range(1, n))
    else:  # chunks: every chunk start goes unscored
        assert scored == [p for p in range(1, n) if p % length]


@pytest.mark.parametrize(("length", "stride"), [(1, 1), (4, 0), (4, 5)])
def test_windows_reject_bad_settings(length: int, stride: int) -> None:
    with pytest.raises(MinimaError, match="max-length|stride"):
        perplexity_windows(10, length, stride)


def hand_nll(model, ids: list[int], length: int, stride: int) -> tuple[float, int]:
    """The documented definition, one forward per token: token p is scored in window k, the first
    whose start k * stride is before p and whose end k * stride + length is after p, with the
    context from the window start."""
    total, count = 0.0, 0
    for p in range(1, len(ids)):
        k = 0
        while k * stride + length <= p:
            k += 1
        begin = k * stride
        if begin >= p:
            continue  # a chunk's first token: no context in its window
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[begin:p]])).logits[0, -1]
        total -= torch.log_softmax(logits.double(), -1)[ids[p]].item()
        count += 1
    return total, count


@pytest.mark.parametrize(("length", "stride"), [(8, 8), (8, 3), (8, 1), (30, 30)])
def test_strided_nll_equals_hand_computation(model, length: int, stride: int) -> None:
    ids = torch.randint(96, (27,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, count = strided_nll(model, ids, max_length=length, stride=stride, batch_size=3)
    expected, expected_count = hand_nll(model, ids, length, stride)
    assert count == expected_count
    assert nll == pytest.approx(expected, rel=1e-5)


def test_stride_equal_to_max_length_is_independent_chunks(model) -> None:
    ids = torch.randint(96, (26,), generator=torch.Generator().manual_seed(2))
    nll, count = strided_nll(model, ids.tolist(), max_length=8, stride=8)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(8):  # 8, 8, 8, 2 tokens
            loss = model(input_ids=chunk[None], labels=chunk[None]).loss.item()
            total += loss * (len(chunk) - 1)
            tokens += len(chunk) - 1
    assert count == tokens == 22
    assert nll == pytest.approx(total, rel=1e-5)
    # a smaller stride gives every token more context: here (a random model) just a different,
    # documented number, and one more token scored per chunk boundary
    assert strided_nll(model, ids.tolist(), max_length=8, stride=4)[1] == 25


def test_document_stream_joins_with_eos(tokenizer) -> None:
    docs = ["one plus one is two.", "the dog runs."]
    ids = document_stream(tokenizer, docs)
    eos = tokenizer.eos_token_id
    first = tokenizer.encode(docs[0], add_special_tokens=False)
    second = tokenizer.encode(docs[1], add_special_tokens=False)
    assert ids == [eos, *first, eos, *second, eos]


# --- multiple choice ----------------------------------------------------------------------------


def test_mc_context_follows_lm_eval_layout() -> None:
    shot = McItem("two plus two is", ("four", "five"), 0)
    item = McItem("one plus one is", ("two", "three"), 0)
    assert mc_context(item, [shot, shot]) == (
        "two plus two is four\n\ntwo plus two is four\n\none plus one is")
    assert mc_context(item, [], "letters") == "one plus one is\nA. two\nB. three\nAnswer:"
    assert mc_choice_texts(item, "letters") == ["A", "B"]


def test_mc_predictions_acc_and_length_normalised() -> None:
    # summed log-likelihood prefers the short choice; per character the long one
    assert mc_predictions([-3.0, -4.0], ["a", "bbbb"]) == (0, 1)
    assert mc_predictions([-1.0, -9.0, -1.6], ["xx", "y", "zzzz"]) == (0, 2)


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding(tokenizer) -> None:
    context, cont = encode_pair(tokenizer, "one plus one is ", "two")
    assert context == tokenizer.encode("one plus one is")
    assert context + cont == tokenizer.encode("one plus one is two")
    assert tokenizer.decode(cont) == " two"


def test_continuation_logliks_equal_explicit_gathers(model, tokenizer) -> None:
    pairs = [encode_pair(tokenizer, "the dog", " runs."),
             encode_pair(tokenizer, "three plus four is", " seven"),
             encode_pair(tokenizer, "a", " b c d e f g h i j k l m")]
    got = continuation_logliks(model, pairs, max_length=64, batch_size=2)
    for (context, cont), (loglik, greedy) in zip(pairs, got, strict=True):
        ids = context + cont
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        picks = [logprobs[len(context) + i - 1] for i in range(len(cont))]
        expected = sum(p[t].item() for p, t in zip(picks, cont, strict=True))
        assert loglik == pytest.approx(expected, rel=1e-5)
        assert greedy == all(p.argmax().item() == t for p, t in zip(picks, cont, strict=True))
    # left truncation to max_length keeps the continuation and the newest context
    context, cont = pairs[1]
    assert len(context) > 3 >= len(cont)
    short = continuation_logliks(model, [pairs[1]], max_length=3, batch_size=1)[0][0]
    ids = (context + cont)[-4:-1]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    expected = sum(logprobs[len(ids) - len(cont) + i, t].item() for i, t in enumerate(cont))
    assert short == pytest.approx(expected, rel=1e-5)
    with pytest.raises(MinimaError, match="does not fit --max-length 3"):
        continuation_logliks(model, [pairs[2]], max_length=3, batch_size=1)


@pytest.mark.parametrize(("record", "message"), [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer index 2 is out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, "answer index -1 is out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "must be a choice index"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "non-empty string"),
])
def test_read_mc_rejects_bad_records(tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "ok", "choices": ["a", "b"],
                                               "answer": "B"}, record])
    with pytest.raises(MinimaError, match=f"q.jsonl:2: .*{message}"):
        read_mc(path)


def test_read_mc_accepts_letters_and_categories(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"question": "x", "choices": ["a", "b", "c"], "answer": "C", "subject": "s"}])
    assert read_mc(path) == [McItem("x", ("a", "b", "c"), 2, "s")]


def test_score_mc_overall_and_by_category() -> None:
    items = [McItem("q", ("a", "bbb"), 0, "x"), McItem("q", ("a", "bbb"), 1, "x"),
             McItem("q", ("a", "bbb"), 1, "y")]
    logliks = [-1.0, -2.0, -1.0, -2.0, -5.0, -2.0]  # acc picks a, a, bbb; acc_norm bbb, bbb, bbb
    result = score_mc(items, logliks, "cloze")
    assert result["acc"] == pytest.approx(2 / 3)
    assert result["acc_norm"] == pytest.approx(2 / 3)
    assert result["by_category"] == {"x": {"acc": 0.5, "acc_norm": 0.5, "n": 2},
                                     "y": {"acc": 1.0, "acc_norm": 1.0, "n": 1}}
    assert result["chance"] == 0.5


@pytest.mark.parametrize(("style", "shots"), [("cloze", 0), ("cloze", 3), ("letters", 2)])
def test_mc_agrees_with_lm_eval_harness(tiny_world: Path, tmp_path: Path, style: str,
                                        shots: int) -> None:
    """The same trained tiny model, the same local task and shots: every request's
    log-likelihood, hence acc and acc_norm, as lm-evaluation-harness computes them."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minima_cli.model.checkpoint import load_model, load_tokenizer, resolve_model

    source = resolve_model(tiny_world / "teacher")
    model, tok = load_model(source), load_tokenizer(source)
    data = tiny_world / "data"
    spec = parse_task(f"mc:{data / 'eval_mc.jsonl'}:shots={shots},"
                         f"dev={data / 'eval_mc_dev.jsonl'},style={style}")
    limit = 16
    ours = eval_mc(model, tok, spec, 64, EvalConfig(limit=limit), False, lambda n: None)

    workdir = tmp_path / "tasks"
    workdir.mkdir()
    name, include, n_shots = lm_eval_task(spec, workdir)
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=64, device="cpu"),
        tasks=[name], num_fewshot=n_shots, limit=limit, bootstrap_iters=0,
        task_manager=TaskManager(include_path=include, include_defaults=False))
    theirs = out["results"][name]
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-9)
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-9)

    items = read_mc(data / "eval_mc.jsonl")[:limit]
    pairs = mc_requests(items, mc_shots(spec), style, tok)
    logliks = [ll for ll, _ in continuation_logliks(model, pairs, max_length=64,
                                                       batch_size=8)]
    harness = [float(r[0][0]) for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])
               for r in s["resps"]]
    assert logliks == pytest.approx(harness, abs=1e-4)
    assert 0 < ours["acc"] <= 1


# --- generation ---------------------------------------------------------------------------------


def test_match_modes() -> None:
    assert match(" five\n", ["five"], "exact")
    assert not match("five.", ["five"], "exact")
    assert match("it is five.", ["four", "five"], "contains")
    assert not match("Five", ["five"], "contains")


def test_read_gen_renders_chat_with_chatml(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "what is one plus one?"},
                      {"role": "assistant", "content": "two"}]},
        {"prompt": "one plus one is", "answer": ["two", "2"]}])
    chat, plain = read_gen(path, tokenizer)
    assert chat == GenItem("<|im_start|>user\nwhat is one plus one?<|im_end|>\n"
                              "<|im_start|>assistant\n", ("two",), True)
    assert plain == GenItem("one plus one is", ("two", "2"), False)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}])
    with pytest.raises(MinimaError, match="bad.jsonl:1: the last message must be the assistant"):
        read_gen(bad, tokenizer)


def test_generate_batched_equals_one_by_one_and_sampling_is_seeded(model, tokenizer) -> None:
    items = [GenItem("the dog", ("x",), False),
             GenItem("three plus four is seven. two plus", ("x",), False)]
    kwargs = {"max_new_tokens": 6, "top_p": 1.0, "max_length": 64}
    together = generate(model, tokenizer, items, temperature=0, batch_size=2, seed=0, **kwargs)
    alone = generate(model, tokenizer, items, temperature=0, batch_size=1, seed=0, **kwargs)
    assert together == alone
    for item, text in zip(items, together, strict=True):  # greedy: argmax, token by token
        ids, new = tokenizer.encode(item.prompt), []
        with torch.no_grad():
            while len(new) < 6:
                token = model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
                if token in stop_token_ids(tokenizer):
                    break
                new.append(token)
        assert text == tokenizer.decode(new)
    sampled = [generate(model, tokenizer, items, temperature=1.0, batch_size=2, seed=s,
                           **kwargs) for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]


# --- task specs ---------------------------------------------------------------------------------


def test_parse_task_kinds_and_options(tmp_path: Path) -> None:
    mc = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"question": "q", "choices": ["a", "b"],
                                                "answer": 1}])
    spec = parse_task(f"mc:{mc}:shots=1,dev={dev}")
    assert (spec.kind, spec.target, spec.options) == ("mc", str(mc), {"shots": "1",
                                                                       "dev": str(dev)})
    assert spec.name == "mc:q:1-shot"
    assert parse_task(str(mc)).kind == "mc"  # a bare file is typed by its records
    assert parse_task("hellaswag", backend="lm-eval") == TaskSpec("lm-eval", "hellaswag")
    assert parse_task("lm-eval:arc_easy:shots=25").options == {"shots": "25"}


@pytest.mark.parametrize(("text", "message"), [
    ("hellaswag", "unknown task 'hellaswag'"),
    ("bogus:file.txt", "unknown task kind 'bogus'"),
    ("mc:missing.jsonl", "file not found: missing.jsonl"),
    ("gen:{mc}:match=fuzzy", "match must be one of exact, contains"),
    ("mc:{mc}:shots=2", "shots=2 needs dev=FILE"),
    ("mc:{mc}:shot=2", "unknown option 'shot' for mc tasks"),
    ("mc:{mc}:shots=two", "shots='two' is not an integer"),
])
def test_parse_task_errors(tmp_path: Path, text: str, message: str) -> None:
    mc = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(MinimaError, match=message):
        parse_task(text.format(mc=mc))


def test_compare_and_table_rows() -> None:
    first = {"parameters": 10, "tokens_per_second": 5.0, "tasks": {
        "mc:q": {"acc": 0.5, "n": 4, "by_category": {"x": {"acc": 0.25, "n": 2}}},
        "ppl:v": {"ppl": 4.0, "tokens": 9}}}
    second = {"parameters": 6, "tokens_per_second": None, "tasks": {
        "mc:q": {"acc": 0.75, "n": 4, "by_category": {"x": {"acc": 0.5, "n": 2}}},
        "ppl:v": {"ppl": 5.5, "tokens": 9}}}
    assert compare([first, second])[1] == {"mc:q": {"acc": 0.25, "acc/x": 0.25},
                                              "ppl:v": {"ppl": 1.5}}
    rows = table_rows([first, second])
    assert rows[0] == ["", "parameters", "10", "6"]
    assert rows[1] == ["", "tokens/s", "5", "-"]
    assert ["mc:q", "acc/x", "0.2500", "0.5000 (+0.2500)"] in rows
    assert ["ppl:v", "ppl", "4.0000", "5.5000 (+1.5000)"] in rows


# --- the command line ---------------------------------------------------------------------------


def test_cli_two_models_side_by_side(tiny_world: Path, tmp_path: Path, capsys) -> None:
    teacher, data = tiny_world / "teacher", tiny_world / "data"
    chance = save_model(tiny_random_model(vocab=512, layers=2, hidden=32), tmp_path / "random")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (chance / name).write_bytes((teacher / name).read_bytes())
    out = tmp_path / "eval"
    code, stdout, stderr = run_cli(
        ["eval", "-m", f"teacher={teacher}", "-m", f"random={chance}",
         "-t", f"ppl:{data / 'valid.txt'}", "-t", f"mc:{data / 'eval_mc.jsonl'}",
         "-t", f"gen:{data / 'chat_eval.jsonl'}:max_tokens=4", "--limit", "12",
         "--max-length", "64", "--stride", "32", "-o", out, "-q"], capsys)
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    teacher_result, random_result = results["models"]
    assert [m["name"] for m in results["models"]] == ["teacher", "random"]
    assert teacher_result["parameters"] > random_result["parameters"] > 0
    assert teacher_result["tokens_per_second"] > 0
    ppl = teacher_result["tasks"]["ppl:valid"]
    assert ppl["stride"] == 32 and ppl["documents"] == 12
    assert 1 < ppl["ppl"] < random_result["tasks"]["ppl:valid"]["ppl"]
    assert random_result["delta_vs_first"]["ppl:valid"]["ppl"] == pytest.approx(
        random_result["tasks"]["ppl:valid"]["ppl"] - ppl["ppl"])
    assert teacher_result["tasks"]["mc:eval_mc"]["n"] == 12
    assert teacher_result["delta_vs_first"]["mc:eval_mc"]["acc"] == 0
    generations = sorted((out / "generations").glob("*.jsonl"))
    assert [g.name for g in generations] == ["0-teacher-gen_chat_eval.jsonl",
                                             "1-random-gen_chat_eval.jsonl"]
    rows = [json.loads(line) for line in generations[0].read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["prompt"].startswith("<|im_start|>user\n")
    assert json.loads((out / "minima.json").read_text())["stage"] == "eval"
    assert "random (vs first)" in stdout and "ppl:valid" in stdout
    assert not list(tmp_path.glob("eval.tmp-*"))


def test_cli_lm_eval_backend_matches_minima(tiny_world: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("lm_eval")
    data = tiny_world / "data"
    task = f"mc:{data / 'eval_facts_mc.jsonl'}:shots=2,dev={data / 'eval_facts_mc_dev.jsonl'}"
    metrics = []
    for backend in ("minima", "lm-eval"):
        code, _, stderr = run_cli(["eval", "-m", tiny_world / "teacher", "-t", task, "--limit",
                                   "16", "--max-length", "64", "-q", "--backend", backend,
                                   "-o", tmp_path / backend], capsys)
        assert code == 0, stderr
        results = json.loads((tmp_path / backend / "results.json").read_text())
        metrics.append(results["models"][0]["tasks"]["mc:eval_facts_mc:2-shot"])
    assert metrics[1]["backend"] == "lm-eval" and metrics[1]["n"] == 16
    for key in ("acc", "acc_norm"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-9)


def test_cli_bad_inputs_exit_2_with_one_line(tiny_world: Path, tmp_path: Path, capsys) -> None:
    teacher, data = tiny_world / "teacher", tiny_world / "data"
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "q", "choices": ["a", "b", "c"], "answer": 0},
        {"question": "q", "choices": ["a", "b", "c"], "answer": 3}])
    no_task = tmp_path / "task.yaml"
    no_task.write_text("dataset_path: json\n")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    dev = data / "eval_mc_dev.jsonl"
    n_dev = len(dev.read_text().splitlines())
    cases = [
        (["-m", teacher, "-t", f"mc:{bad}"], "bad.jsonl:2: answer index 3 is out of range"),
        (["-m", teacher, "-t", "truthfulness"], "unknown task 'truthfulness'"),
        (["-m", not_a_model, "-t", f"ppl:{data / 'valid.txt'}"], "no config.json"),
        (["-m", teacher, "-t", f"mc:{data / 'eval_mc.jsonl'}:shots={n_dev + 1},dev={dev}"],
         f"shots={n_dev + 1} but the dev file {dev} has only {n_dev} examples"),
        (["-m", teacher, "-t", f"ppl:{data / 'valid.txt'}", "--max-length", "8", "--stride",
          "9"], "--stride must be in 1..max-length (8), got 9"),
        (["-m", teacher, "-t", f"lm-eval:{no_task}"], "a harness task YAML needs a 'task: NAME'"),
        (["-m", teacher, "-m", teacher, "-t", f"ppl:{data / 'valid.txt'}"], "share a name"),
        (["-m", teacher, "-t", f"ppl:{data / 'valid.txt'}", "--device", "gpu0"],
         "--device 'gpu0' is not a device"),
    ]
    for args, message in cases:
        code, stdout, stderr = run_cli(["eval", *args, "-o", tmp_path / "out", "-q"], capsys)
        assert code == 2, (args, stderr)
        assert stderr.startswith("error: ") and message in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_ppl_matches_the_tiny_worlds_valid_perplexity(tiny_world: Path, tmp_path: Path,
                                                       capsys) -> None:
    """stride == max_length == the training block length is the tiny world's own valid loss
    (up to the one-token offset of the leading EOS and the scored tail)."""
    code, _, stderr = run_cli(["eval", "-m", tiny_world / "teacher", "-t",
                               f"ppl:{tiny_world / 'data' / 'valid.txt'}", "--max-length", "64",
                               "--stride", "64", "-q", "-o", tmp_path / "eval"], capsys)
    assert code == 0, stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    ppl = results["models"][0]["tasks"]["ppl:valid"]["ppl"]
    from minima_cli.data.pack import pack_documents
    from minima_cli.data.read import read_documents
    from minima_cli.data.tokenize import tokenize_documents
    from minima_cli.model.checkpoint import load_model, load_tokenizer, resolve_model
    from minima_cli.training.state import evaluate_loss

    source = resolve_model(tiny_world / "teacher")
    tok = load_tokenizer(source)
    blocks = pack_documents(tokenize_documents(tok, read_documents(tiny_world / "data" /
                                                                   "valid.txt")), 64, 0)
    block_ppl = math.exp(evaluate_loss(load_model(source), blocks))
    assert ppl == pytest.approx(block_ppl, rel=0.05)
