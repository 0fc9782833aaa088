"""`minima sft`: chat formats, the assistant-only label mask token by token (every format, both
ways of finding the spans, with packing), packed examples kept apart, the ChatML default saved
with the model, exact resume after SIGKILL, the teacher's KD part, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli, sft_args, tiny_random_model
from safetensors.torch import load_file

from minima_cli.data.chat import (
    CHATML_TEMPLATE,
    ChatRowStream,
    Example,
    chat_prompt,
    collate,
    encode_conversations,
    fit_examples,
    make_rows,
    pack_examples,
    to_messages,
)
from minima_cli.errors import MinimaError
from minima_cli.losses import IGNORE_INDEX
from minima_cli.runtime import torch_threads
from minima_cli.stages.configs import SftConfig
from minima_cli.stages.sft import make_evaluate_fn, make_loss_fn


@pytest.fixture(scope="module")
def world(chat_world) -> Path:
    return chat_world


@pytest.fixture(scope="module")
def tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world / "teacher")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, above all on a busy machine."""
    with torch_threads(1):
        yield


SYSTEM, QUESTION, ANSWER = "be brief.", "what is two plus two?", "four"
RECORDS = {
    "messages": {"messages": [{"role": "user", "content": QUESTION},
                              {"role": "assistant", "content": ANSWER}]},
    "sharegpt": {"conversations": [{"from": "human", "value": QUESTION},
                                   {"from": "gpt", "value": ANSWER}]},
    "prompt-response": {"prompt": QUESTION, "response": ANSWER},
    "instruction": {"instruction": "what is two plus", "input": "two?", "output": ANSWER},
}
EXPECTED_USER = {"instruction": "what is two plus\n\ntwo?"}


@pytest.mark.parametrize("kind", RECORDS)
def test_formats_become_messages(kind):
    found, messages = to_messages(RECORDS[kind], "x:1")
    assert found == kind
    assert messages == [{"role": "user", "content": EXPECTED_USER.get(kind, QUESTION)},
                        {"role": "assistant", "content": ANSWER}]
    with_system = {**RECORDS[kind], "system": SYSTEM} if kind in ("prompt-response",
                                                                   "instruction") else None
    if with_system:
        assert to_messages(with_system, "x:1")[1][0] == {"role": "system", "content": SYSTEM}


def pieces_of(messages):
    """ChatML as (text, is_assistant) pieces: the reply and its <|im_end|> are the assistant's."""
    out = []
    for m in messages:
        out += [("<|im_start|>", False), (m["role"] + "\n", False)]
        mine = m["role"] == "assistant"
        out += [(m["content"], mine), ("<|im_end|>", mine), ("\n", False)]
    return out


def expected_tokens(tokenizer, messages):
    ids, mask = [], []
    for text, mine in pieces_of(messages):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [mine] * len(piece)
    return ids, mask


CONVERSATIONS = [
    *(to_messages(record, "x")[1] for record in RECORDS.values()),
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "count from one to three."},
     {"role": "assistant", "content": "one two three"}, {"role": "user", "content": "and again?"},
     {"role": "assistant", "content": "one two three"}],
]


# The same ChatML without the {% generation %} markers: its assistant spans are found by rendering
# the turns incrementally.
PLAIN_CHATML = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def test_chatml_renders_the_same_text_with_or_without_generation_markers(tokenizer):
    """sft trains on what the marked template renders; `minima eval` prompts with `chat_prompt`:
    both are plain ChatML, so a model is prompted the way it was trained."""
    assert PLAIN_CHATML != CHATML_TEMPLATE
    for messages in CONVERSATIONS:
        for opener in (False, True):
            texts = {tokenizer.apply_chat_template(messages, chat_template=template,
                                                   tokenize=False, add_generation_prompt=opener)
                     for template in (CHATML_TEMPLATE, PLAIN_CHATML)}
            assert len(texts) == 1
        expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                           for m in messages[:-1]) + "<|im_start|>assistant\n"
        assert chat_prompt(tokenizer, messages[:-1]) == expected


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, PLAIN_CHATML],
                         ids=["generation-blocks", "incremental-prefixes"])
def test_label_mask_is_exactly_the_assistant_tokens(tokenizer, template):
    examples = encode_conversations(tokenizer, template, CONVERSATIONS)
    for messages, example in zip(CONVERSATIONS, examples, strict=True):
        ids, mask = expected_tokens(tokenizer, messages)
        assert example.ids == ids  # the pieces tokenize as the whole: the comparison is exact
        assert example.mask == mask
        batch = collate([[example]], pad_id=1)
        labels = batch["labels"][0].tolist()
        assert labels == [ids[t + 1] if mask[t + 1] else IGNORE_INDEX
                          for t in range(len(ids) - 1)] + [IGNORE_INDEX]
        decoded = tokenizer.decode([i for i in labels if i != IGNORE_INDEX])
        assert decoded == "".join(m["content"] + "<|im_end|>" for m in messages
                                  if m["role"] == "assistant")


def test_packing_keeps_examples_whole_and_apart(tokenizer):
    examples = encode_conversations(tokenizer, CHATML_TEMPLATE, CONVERSATIONS * 3)
    lengths = [len(e.ids) for e in examples]
    seq_len = max(lengths) + min(lengths)
    rows = pack_examples(lengths, seq_len)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(lengths[i] for i in row) <= seq_len for row in rows)
    assert len(rows) < len(examples) and pack_examples(lengths, seq_len) == rows
    packed = make_rows(examples, seq_len, packing=True)
    assert sum(len(row) > 1 for row in packed) >= 3 and len({len(r) for r in packed}) > 1
    batch = collate(packed, pad_id=1)
    # token by token: each row's labels are its examples' own labels, then padding
    for r, row in enumerate(packed):
        alone = [collate([[e]], pad_id=1)["labels"][0].tolist() for e in row]
        flat = [label for labels in alone for label in labels]
        assert batch["labels"][r, :len(flat)].tolist() == flat
        assert (batch["labels"][r, len(flat):] == IGNORE_INDEX).all()
        starts = [sum(len(e.ids) for e in row[:k]) for k in range(len(row))]
        assert all(batch["position_ids"][r, s] == 0 for s in starts)
    # packed examples do not see each other (through the loss functions' own forward call):
    # every example's logits equal those of the example alone
    model = tiny_random_model("llama", vocab=len(tokenizer))
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.logits))
    with torch.no_grad():
        make_loss_fn(SftConfig(), None, len(tokenizer))(model, batch)
        logits = seen[0]
        for r, row in enumerate(packed):
            offset = 0
            for example in row:
                alone = model(input_ids=torch.tensor([example.ids])).logits[0]
                torch.testing.assert_close(logits[r, offset:offset + len(example.ids)], alone,
                                           rtol=1e-4, atol=1e-5)
                offset += len(example.ids)
    # and the validation loss is the same packed or not
    unpacked = make_rows(examples, seq_len, packing=False)
    assert make_evaluate_fn(packed, 4, 1, "cpu")(model) == pytest.approx(
        make_evaluate_fn(unpacked, 4, 1, "cpu")(model), rel=1e-5)


def test_long_examples_are_cut_and_emptied_ones_dropped():
    short = Example([5, 6, 7], [False, True, True])
    long = Example([5, 6, 7, 8, 9], [False, False, False, True, True])
    kept, counts = fit_examples([short, long], seq_len=3)
    assert kept == [short] and counts == {"truncated": 1, "dropped": 1}
    with pytest.raises(MinimaError, match="seq_len=3"):
        pack_examples([4], 3)


def test_stream_resumes_exactly_and_reshuffles_each_epoch():
    rows = [[Example([i, i + 1, i + 2], [False, True, True])] for i in range(5)]
    stream = ChatRowStream(rows, batch_size=2, pad_id=0, seed=3, fingerprint="f")
    first_epoch = [next(stream)["input_ids"][:, 0].tolist() for _ in range(2)]
    state = stream.state_dict()
    rest = [next(stream)["input_ids"][:, 0].tolist() for _ in range(4)]
    resumed = ChatRowStream(rows, batch_size=2, pad_id=0, seed=3, fingerprint="f")
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [next(resumed)["input_ids"][:, 0].tolist() for _ in range(4)] == rest
    served = [x for batch in first_epoch + rest for x in batch]
    assert sorted(served[:5]) == sorted(served[5:10]) == list(range(5))
    assert served[:5] != served[5:10]  # a new order in the second epoch
    with pytest.raises(MinimaError, match="different run"):
        ChatRowStream(rows, batch_size=2, pad_id=0, seed=3, fingerprint="g").load_state_dict(state)
    # two ranks serve the halves of the same global batches; their shares weight each rank's
    # mean so that the averaged gradient is the global token mean
    rows[0] = [Example([9, 9, 9, 9, 9], [False, True, True, True, True])]
    ranks = [ChatRowStream(rows, batch_size=1, pad_id=0, seed=3, rank=r, world_size=2)
             for r in (0, 1)]
    single = ChatRowStream(rows, batch_size=2, pad_id=0, seed=3)
    for _ in range(5):
        both, whole = [next(s) for s in ranks], next(single)
        assert torch.equal(torch.cat([b["input_ids"][:, :3] for b in both]),
                           whole["input_ids"][:, :3])
        counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in both]
        assert [float(b["share"]) for b in both] == pytest.approx(
            [2 * c / sum(counts) for c in counts])


def test_accumulation_weights_micro_batches_by_their_tokens_and_resumes_inside_a_step():
    rows = [[Example([i] * (2 + i), [False] + [True] * (1 + i))] for i in range(7)]
    plain = ChatRowStream(rows, batch_size=1, pad_id=0, seed=5, fingerprint="f")
    accum = ChatRowStream(rows, batch_size=1, pad_id=0, seed=5, fingerprint="f", grad_accum=3)
    for _ in range(4):  # an optimizer step: 3 micro-batches, one of them across an epoch end
        steps = [next(accum) for _ in range(3)]
        assert [b["input_ids"].tolist() for b in steps] == [
            next(plain)["input_ids"].tolist() for _ in range(3)]
        counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in steps]
        assert [float(b["share"]) for b in steps] == pytest.approx(
            [3 * c / sum(counts) for c in counts])
    next(accum)
    state = json.loads(json.dumps(accum.state_dict()))  # one micro-batch into a step
    rest = [next(accum) for _ in range(5)]
    resumed = ChatRowStream(rows, batch_size=1, pad_id=0, seed=5, fingerprint="f", grad_accum=3)
    resumed.load_state_dict(state)
    for want in rest:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert float(got["share"]) == float(want["share"])
    with pytest.raises(MinimaError, match="grad-accum"):
        ChatRowStream(rows, batch_size=1, pad_id=0, seed=5, fingerprint="f").load_state_dict(state)


def test_accumulated_steps_train_like_one_big_batch(world, tmp_path, capsys):
    """2 micro-batches of 2 == 1 batch of 4: the step's loss is the mean over all its assistant
    tokens, so short and long micro-batches count by their tokens."""
    big, accumulated = tmp_path / "big", tmp_path / "accumulated"
    assert run_cli(sft_args(world, big, "--max-steps", "3"), capsys)[0] == 0
    assert run_cli([*sft_args(world, accumulated, "--max-steps", "3"), "--batch-size", "2",
                    "--grad-accum", "2"], capsys)[0] == 0
    losses = [[json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
              for out in (big, accumulated)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    expected, actual = (load_file(out / "model.safetensors") for out in (big, accumulated))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)


def test_sft_saves_chatml_and_reloads_with_plain_transformers(world, tmp_path, capsys):
    out = tmp_path / "chat"
    code, stdout, _ = run_cli(sft_args(world, out, "--max-steps", "4", "--packing"), capsys)
    assert code == 0 and "valid loss" in stdout
    assert not (tmp_path / "chat.run").exists()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "valid_loss" in records[-1]
    manifest = json.loads((out / "minima.json").read_text())
    assert manifest["stage"] == "sft" and manifest["inputs"]["data"]["packing"] is True
    assert manifest["inputs"]["data"]["formats"] == {"messages": 64}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    assert tok.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_teacher_adds_a_kd_part(world, tmp_path, capsys):
    out = tmp_path / "kd"
    code, _, _ = run_cli(sft_args(world, out, "--max-steps", "2", "--teacher",
                                  world / "teacher", "--alpha", "0.3"), capsys)
    assert code == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("kd" in r and "ce" in r for r in records)
    assert records[0]["loss"] == pytest.approx(0.3 * records[0]["ce"] + 0.7 * records[0]["kd"],
                                               rel=1e-4)


def test_bad_sft_inputs_fail_in_one_line_and_write_nothing(world, tmp_path, capsys):
    def data(name, records):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    user_only = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (["-d", data("unknown.jsonl", [{"question": "q", "answer": "a"}])],
         "unknown chat format (fields: question, answer)"),
        (["-d", data("noreply.jsonl", [RECORDS["messages"], user_only])],
         "noreply.jsonl:2: the conversation has no assistant turn"),
        (["-d", data("empty.jsonl", [])], "no conversations in"),
        (["-d", tmp_path / "missing.jsonl"], "chat data not found"),
        (["--seq-len", "4096"], "exceeds the model's 256 positions"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--loss", "mse"], "unknown loss"),
        (["--resume"], "no training checkpoint"),
    ]
    out = tmp_path / "out"
    for extra, message in cases:
        args = sft_args(world, out)
        if extra[0] == "-d":
            args[args.index("-d") + 1] = extra[1]
            extra = []
        code, _, err = run_cli([*args, *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, lines)
        assert not out.exists() and not (tmp_path / "out.run").exists()


def test_a_tokenizer_without_chatml_tokens_gets_them(world, tmp_path, capsys):
    """No chat template and no <|im_start|>/<|im_end|>: they are added as special tokens and the
    embeddings grow (TRL's setup_chat_format); with a teacher that is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from minima_cli.data.tiny_corpus import make_corpus

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(make_corpus(50), trainers.BpeTrainer(
        vocab_size=280, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    base = tmp_path / "base"
    tiny_random_model("llama", vocab=backend.get_vocab_size()).save_pretrained(base)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(base)
    out = tmp_path / "chat"
    args = sft_args(world, out, "--max-steps", "2", "--seq-len", "128")
    args[args.index("-m") + 1] = base
    assert run_cli(args, capsys)[0] == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == backend.get_vocab_size() + 2
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids["input_ids"]
    code, _, err = run_cli([*args, "--teacher", base, "--force"], capsys)
    assert code == 2 and "no chat template and no <|im_start|> / <|im_end|>" in err


def test_on_policy_prompts_are_the_conversation_before_the_first_reply(tokenizer):
    """Each example of a (packed, padded) batch gives one prompt: what `minima eval` would
    prompt with for its first assistant turn, opener included."""
    from minima_cli.stages.sft import chat_prompts, longest_prompt

    examples = encode_conversations(tokenizer, CHATML_TEMPLATE, CONVERSATIONS)
    rows = make_rows(examples, 96, packing=True)
    assert len(rows) < len(examples)  # several examples share a row
    batch = collate(rows, pad_id=1)
    prompts = chat_prompts(batch["input_ids"], batch["labels"], batch["position_ids"])
    by_ids = {tuple(e.ids): messages for e, messages in zip(examples, CONVERSATIONS,
                                                            strict=True)}
    expected = []
    for row in rows:
        for example in row:
            messages = by_ids[tuple(example.ids)]
            first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            expected.append(chat_prompt(tokenizer, messages[:first]))
    assert [tokenizer.decode(p) for p in prompts] == expected
    assert longest_prompt(rows) == max(len(p) for p in prompts)


def perturbed_teacher(world, directory):
    """The world's model with noise on its weights (and its tokenizer): a teacher that differs."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world / "teacher")
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (world / "teacher" / name).is_file():
            shutil.copy(world / "teacher" / name, directory / name)
    return directory


def test_on_policy_sft(world, tmp_path, capsys, monkeypatch):
    """lambda 0 with a teacher is bitwise the run without the step hook; lambda 1, greedy: the
    logged loss of step 1 is forward KL on the model's own answers to the batch's prompts (a
    naive loop per example, no cache, no padding), generated tokens only."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima_cli.stages import sft

    teacher = perturbed_teacher(world, tmp_path / "teacher")
    steps = ["--max-steps", "2", "--teacher", teacher]
    flagged, plain = tmp_path / "flagged", tmp_path / "plain"
    assert run_cli([*sft_args(world, flagged, *steps), "--on-policy", "0"], capsys)[0] == 0
    with monkeypatch.context() as patch:
        patch.setattr(sft, "OnPolicy",
                      SimpleNamespace(for_session=lambda *args, **kwargs: None))
        assert run_cli(sft_args(world, plain, *steps), capsys)[0] == 0
    assert len({hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
                for out in (flagged, plain)}) == 1

    batches = []
    original = sft.make_loss_fn

    def spy(*args, **kwargs):
        loss_fn = original(*args, **kwargs)

        def recording(model, batch):
            batches.append({k: v.clone() for k, v in batch.items()})
            return loss_fn(model, batch)

        return recording

    monkeypatch.setattr(sft, "make_loss_fn", spy)
    out, new = tmp_path / "on-policy", 5
    code, _, err = run_cli([*sft_args(world, out, *steps), "--on-policy", "1",
                            "--gen-temperature", "0", "--gen-tokens", str(new)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in records] == [1, 1]

    from minima_cli.evaluation.generation import stop_token_ids
    from minima_cli.stages.sft import chat_prompts

    student = AutoModelForCausalLM.from_pretrained(world / "teacher").eval()
    scorer = AutoModelForCausalLM.from_pretrained(teacher).eval()
    tok = AutoTokenizer.from_pretrained(world / "teacher")
    vocab, stops = len(tok), stop_token_ids(tok)
    per_token, generated = [], 0
    with torch.no_grad():
        batch = batches[0]
        for prompt in chat_prompts(batch["input_ids"], batch["labels"], batch["position_ids"]):
            sequence = list(prompt)
            for _ in range(new):
                token = int(student(input_ids=torch.tensor([sequence])).logits[0, -1,
                                                                                :vocab].argmax())
                sequence.append(token)
                if token in stops:
                    break
            generated += len(sequence) - len(prompt)
            ids = torch.tensor([sequence])
            log_p = scorer(input_ids=ids).logits[0, len(prompt) - 1:-1, :vocab].log_softmax(-1)
            log_q = student(input_ids=ids).logits[0, len(prompt) - 1:-1, :vocab].log_softmax(-1)
            per_token.append((log_p.exp() * (log_p - log_q)).sum(-1))
    assert records[0]["generated_tokens"] == generated
    assert records[0]["loss"] == pytest.approx(torch.cat(per_token).mean().item(), rel=1e-5)
    metrics = json.loads((out / "minima.json").read_text())["metrics"]
    assert metrics["on_policy_steps"] == 2
    assert metrics["generated_tokens"] == sum(r["generated_tokens"] for r in records)


def test_bad_on_policy_sft_inputs(world, tmp_path, capsys):
    cases = [
        (["--on-policy", "0.5"], "--on-policy needs --teacher"),
        (["--on-policy", "1", "--teacher", world / "teacher", "--gen-tokens", "250"],
         "+ --gen-tokens 250 exceed the model's 256 positions"),
    ]
    out = tmp_path / "out"
    for extra, message in cases:
        code, _, err = run_cli([*sft_args(world, out), *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, lines)
        assert not out.exists() and not (tmp_path / "out.run").exists()
