"""`minima distill` (single process): a run improves the pruned student, a SIGKILLed run resumed
with --resume ends bitwise equal to an uninterrupted one, and bad inputs fail in one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import distill_args, run_cli, save_model, tiny_random_model
from safetensors.torch import load_file
from transformers import AutoConfig

from minima_cli.cli.app import main


def test_distill_improves_the_pruned_student(tiny_world, pruned, tmp_path):
    out = tmp_path / "student"
    assert main(distill_args(tiny_world, pruned, out, steps=12)) == 0

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 12 and records[-1]["loss"] < records[0]["loss"]
    assert not (tmp_path / "student.run").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 48


def test_bad_distill_inputs(tiny_world, pruned, tmp_path, capsys):
    other = tmp_path / "other"  # embeddings for its own 300-token tokenizer
    save_model(tiny_random_model("llama", vocab=300), other)
    from minima_cli.data.tiny_corpus import make_corpus
    from minima_cli.stages.tiny import train_tokenizer

    train_tokenizer(make_corpus(50, seed=7), vocab_size=300).save_pretrained(other)
    broken = tmp_path / "broken"
    save_model(tiny_random_model("llama"), broken)
    (broken / "tokenizer.json").write_text("{not json")
    out = tmp_path / "out"
    ds_with_optimizer = tmp_path / "ds_optimizer.json"
    ds_with_optimizer.write_text('{"optimizer": {"type": "AdamW"}}')
    not_a_cache = tmp_path / "not_a_cache"
    not_a_cache.mkdir()
    ds_not_json = tmp_path / "ds.json"
    ds_not_json.write_text("{stage: 2")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_field = tmp_path / "records.jsonl"
    no_field.write_text('{"body": "some text"}\n')
    bad_yaml = tmp_path / "recipe.yaml"
    bad_yaml.write_text("distill:\n  max_step: 3\n")
    capsys.readouterr()  # drop the set-up's output
    cases = [
        (["-s", other], "tokenizers differ"),
        (["-s", broken], "cannot load tokenizer"),
        (["--max-steps", "0"], "--max-steps must be positive"),
        (["--lr", "-1"], "must be positive"),
        (["--clip", "-1"], "--clip must be >= 0"),
        (["--seq-len", "4096"], "exceeds the student's 256 positions"),
        (["--alpha", "2"], "must be in [0, 1]"),
        (["--loss", "mse"], "unknown loss"),
        (["--resume"], "no training checkpoint"),
        (["--deepspeed", tmp_path / "missing.json"], "does not exist"),
        (["--deepspeed", ds_with_optimizer], "remove the 'optimizer' section"),
        (["--deepspeed", ds_not_json], "is not valid JSON"),
        (["--teacher-cache", not_a_cache], "not a minima output"),
        (["-d", empty], "no documents"),
        (["-d", no_field], "no field 'text'"),
        (["--hidden-weight", "-1"], "--hidden-weight must be >= 0"),
        (["--precision", "fp8"], "unknown precision"),
        (["--config", bad_yaml], "distill.max_step: unknown key (did you mean 'max_steps'?)"),
    ]
    for extra, message in cases:
        args = distill_args(tiny_world, pruned, out)
        if extra[0] in ("-s", "-d"):
            args[args.index(extra[0]) + 1] = str(extra[1])
            extra = []
        code = main([*args, *map(str, extra)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
        assert not out.exists()
        assert not (tmp_path / "out.run").exists(), extra


def test_resume_refuses_a_checkpoint_of_another_run(tiny_world, pruned, tmp_path, capsys):
    from minima_cli.model.checkpoint import load_model, resolve_model
    from minima_cli.training.config import TrainConfig
    from minima_cli.training.loop import build_optimizer
    from minima_cli.training.state import save_training_checkpoint

    model = load_model(resolve_model(str(pruned)))
    save_training_checkpoint(tmp_path / "out.run" / "checkpoints", model,
                             build_optimizer(model, TrainConfig()), 2,
                             {"run_id": {"config": "another"}, "data": {}})
    code, _, err = run_cli([*distill_args(tiny_world, pruned, tmp_path / "out"), "--resume"],
                           capsys)
    assert code == 2 and "belongs to a different run" in err
    assert not (tmp_path / "out").exists()


def test_offline_teacher_cache_trains_like_the_online_top_k(tiny_world, pruned, tmp_path):
    data = tiny_world / "data" / "train.txt"
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "-t", str(tiny_world / "teacher"), "-d", str(data), "-o",
                 str(cache), "--seq-len", "32", "-k", "16", "--dtype", "float32",
                 "--blocks-per-shard", "64", "-q"]) == 0
    manifest = json.loads((cache / "minima.json").read_text())
    assert len(manifest["shards"]) > 1 and manifest["config"]["k"] == 16
    topk = ["--loss", "topk", "--topk", "16"]
    online, offline = tmp_path / "online", tmp_path / "offline"
    assert main([*distill_args(tiny_world, pruned, online, steps=4), *topk]) == 0
    args = distill_args(tiny_world, pruned, offline, steps=4)
    at = args.index("-t")
    del args[at:at + 2]  # no teacher in memory
    assert main([*args, *topk, "--teacher-cache", str(cache)]) == 0
    expected = load_file(online / "model.safetensors")
    actual = load_file(offline / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)
    # model FLOPs: the cached teacher runs no forward, the online one does
    from minima_cli.model.arch import shape_from_config
    from minima_cli.training.flops import forward_flops_per_token, train_flops_per_token

    shapes = {name: shape_from_config(AutoConfig.from_pretrained(path)) for name, path in
              (("student", pruned), ("teacher", tiny_world / "teacher"))}
    flops = {name: json.loads((path / "minima.json").read_text())["metrics"]["flops_per_token"]
             for name, path in (("online", online), ("offline", offline))}
    assert flops["offline"] == train_flops_per_token(shapes["student"], 32)
    assert flops["online"] == flops["offline"] + forward_flops_per_token(shapes["teacher"], 32)
    # a cache is tied to its data: another seed means another validation split and block order
    code = main([*args, *topk, "--teacher-cache", str(cache), "--seed", "3", "--force"])
    assert code == 2


# bf16: the full head rounds its logits to bf16, the sparse head's k dot products are fp32;
# Adam turns that noise on near-zero gradients into updates of up to ~lr (3e-3) a step
@pytest.mark.parametrize("precision,tol,weight_tol", [("fp32", 1e-5, 1e-5),
                                                      ("bf16", 1e-2, 2e-2)])
def test_top_k_without_ce_skips_the_lm_head_and_trains_alike(tiny_world, pruned, tmp_path,
                                                            monkeypatch, precision, tol,
                                                            weight_tol):
    # --loss topk --alpha 0 reads the student's logits at the teacher's k tokens only: the step
    # builds those k logits from lm_head rows instead of the full head, with the same result
    from minima_cli.model.arch import shape_from_config
    from minima_cli.stages import distill
    from minima_cli.training.flops import forward_flops_per_token, train_flops_per_token

    calls = []
    real = distill.fused_linear_distillation_loss
    monkeypatch.setattr(distill, "fused_linear_distillation_loss",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    options = ["--loss", "topk", "--topk", "16", "--alpha", "0", "--precision", precision]
    sparse, full = tmp_path / "sparse", tmp_path / "full"
    assert main([*distill_args(tiny_world, pruned, sparse, steps=4), *options]) == 0
    assert calls  # the sparse head ran
    monkeypatch.setattr(distill, "sparse_head_applies", lambda *a: False)
    calls.clear()
    assert main([*distill_args(tiny_world, pruned, full, steps=4), *options]) == 0
    assert not calls
    losses = [[json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
              for out in (sparse, full)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=0,
                               rtol=tol)
    expected = load_file(full / "model.safetensors")
    actual = load_file(sparse / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=weight_tol, rtol=0)
    # model FLOPs count the k lm_head rows the step computes, not the whole head
    student = shape_from_config(AutoConfig.from_pretrained(pruned))
    teacher = shape_from_config(AutoConfig.from_pretrained(tiny_world / "teacher"))
    metrics = json.loads((sparse / "minima.json").read_text())["metrics"]
    assert metrics["flops_per_token"] == train_flops_per_token(student, 32, head_columns=16) \
        + forward_flops_per_token(teacher, 32)


def test_hidden_state_loss_on_kept_dims_and_yaml_config(tiny_world, pruned, tmp_path, capsys):
    recipe = tmp_path / "distill.yaml"
    recipe.write_text("distill:\n  hidden_weight: 1.0\n  max_steps: 3\n  loss: rkl\n")
    out = tmp_path / "student"
    args = distill_args(tiny_world, pruned, out, steps=2)  # --max-steps 2 beats the file's 3
    assert main([*args, "--config", str(recipe)]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["hidden_mse"] > 0 for r in records)
    manifest = json.loads((out / "minima.json").read_text())
    assert manifest["config"]["loss"] == "rkl" and manifest["config"]["max_steps"] == 2
    prune_manifest = json.loads((pruned / "minima.json").read_text())
    assert manifest["hidden_map"]["kept_hidden"] == prune_manifest["kept"]["hidden"]
    assert [t for _, t in manifest["hidden_map"]["pairs"]] == prune_manifest["kept"]["layers"]
    assert (out / "tensorboard").is_dir()
    # a student of another width with no prune manifest cannot be mapped onto the teacher
    import shutil

    orphan = tmp_path / "orphan"
    shutil.copytree(pruned, orphan)
    (orphan / "minima.json").unlink()
    capsys.readouterr()
    code, _, err = run_cli([*distill_args(tiny_world, orphan, tmp_path / "x", steps=2),
                            "--hidden-weight", "1"], capsys)
    assert code == 2 and "cannot be mapped" in err


def test_alpha_one_is_the_lm_loss_without_the_teacher(tiny_world, pruned, tmp_path,
                                                      monkeypatch):
    from minima_cli.losses import distillation_loss, summed_cross_entropy
    from minima_cli.stages import distill

    logits = torch.randn(2, 5, 40, requires_grad=True)
    labels = distill.next_token_labels(torch.randint(0, 40, (2, 5)))
    total, count = summed_cross_entropy(logits, labels)
    plain = total / count
    (plain_grad,) = torch.autograd.grad(plain, logits)
    mixed, _ = distillation_loss(logits, torch.randn(2, 5, 40), labels, alpha=1.0)
    (mixed_grad,) = torch.autograd.grad(mixed, logits)
    torch.testing.assert_close(plain, mixed, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_grad, mixed_grad, atol=1e-6, rtol=0)

    def no_teacher(*args, **kwargs):
        raise AssertionError("alpha 1 must not load the teacher")

    monkeypatch.setattr(distill, "load_teacher", no_teacher)
    out = tmp_path / "ce-only"
    assert main([*distill_args(tiny_world, pruned, out, steps=4), "--alpha", "1"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all("kd" not in r and r["loss"] == r["ce"] for r in records)


def test_on_policy_zero_is_bitwise_the_run_without_it(tiny_world, pruned, tmp_path, monkeypatch):
    """--on-policy 0 trains exactly as distill without the flag, and as the loss function and
    loop without the on-policy step hook at all (today's code path)."""
    import hashlib

    from minima_cli.stages import distill

    flagged, plain = tmp_path / "flagged", tmp_path / "plain"
    assert main([*distill_args(tiny_world, pruned, flagged, steps=4), "--on-policy", "0"]) == 0
    monkeypatch.setattr(distill, "OnPolicy",
                        SimpleNamespace(for_session=lambda *args, **kwargs: None))
    assert main(distill_args(tiny_world, pruned, plain, steps=4)) == 0
    digests = {hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
               for out in (flagged, plain)}
    assert len(digests) == 1
    records = [json.loads(line) for line in (flagged / "log.jsonl").read_text().splitlines()]
    assert all(r["on_policy"] == 0 and r["generate_s"] == 0 and r["generated_tokens"] == 0
               and r["teacher_s"] > 0 for r in records)
    metrics = json.loads((flagged / "minima.json").read_text())["metrics"]
    assert metrics["on_policy_steps"] == 0 and metrics["generated_tokens"] == 0


def test_greedy_on_policy_loss_equals_a_hand_computation(tiny_world, pruned, tmp_path,
                                                         monkeypatch):
    """lambda 1, greedy: step 1's logged loss is the forward KL of teacher and student on the
    student's own greedy continuation (a naive loop: a full forward per token, no cache),
    counted on the generated tokens only (alpha ignored: KD only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima_cli.stages import distill

    batches = []
    original = distill.make_loss_fn

    def spy(*args, **kwargs):
        loss_fn = original(*args, **kwargs)

        def recording(student, batch):
            batches.append(batch.clone())
            return loss_fn(student, batch)

        return recording

    monkeypatch.setattr(distill, "make_loss_fn", spy)
    out = tmp_path / "greedy"
    prompt, new = 10, 6
    assert main([*distill_args(tiny_world, pruned, out, steps=1), "--batch-size", "2",
                 "--on-policy", "1", "--gen-temperature", "0", "--gen-tokens", str(new),
                 "--prompt-tokens", str(prompt), "--alpha", "0.5"]) == 0
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert record["on_policy"] == 1 and record["generate_s"] > 0

    tokenizer = AutoTokenizer.from_pretrained(pruned)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    student = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world / "teacher",
                                                   dtype=torch.float32).eval()
    per_token, generated = [], 0
    with torch.no_grad():
        for row in batches[0][:, :prompt].tolist():
            sequence = list(row)
            for _ in range(new):
                token = int(student(input_ids=torch.tensor([sequence])).logits[0, -1,
                                                                                :vocab].argmax())
                sequence.append(token)
                if token == eos:
                    break
            generated += len(sequence) - prompt
            ids = torch.tensor([sequence])
            log_p = teacher(input_ids=ids).logits[0, prompt - 1:-1, :vocab].log_softmax(-1)
            log_q = student(input_ids=ids).logits[0, prompt - 1:-1, :vocab].log_softmax(-1)
            per_token.append((log_p.exp() * (log_p - log_q)).sum(-1))
    expected = torch.cat(per_token).mean().item()
    assert record["generated_tokens"] == generated
    # the step trained on prompt + generated tokens (not --seq-len blocks): its tokens/s and
    # MFU count those
    assert record["step_tokens"] == 2 * prompt + generated
    assert record["tflops"] * 1e12 == pytest.approx(
        record["flops_per_token"] * record["step_tokens"] / record["step_s"], rel=1e-9)
    assert record["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert record["kd"] == record["loss"]  # KD only on an on-policy step
    metrics = json.loads((out / "minima.json").read_text())["metrics"]
    assert metrics["on_policy_steps"] == 1 and metrics["generated_tokens"] == generated


def test_on_policy_in_bf16_generates_and_scores_in_bf16(tiny_world, pruned, tmp_path,
                                                         monkeypatch):
    """--precision bf16: the student generates under bf16 autocast, and step 1's loss is the
    forward KL, on the generated tokens, of the bf16 teacher and the autocast student on the very
    sequences the run scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima_cli.losses import IGNORE_INDEX
    from minima_cli.training import on_policy

    head_dtypes, scored_batches = [], []
    original_generate, original_kd = on_policy.generate, on_policy.OnPolicy.kd_on_generated

    def generate(model, *args, **kwargs):
        hook = model.get_output_embeddings().register_forward_hook(
            lambda module, inputs, output: head_dtypes.append(output.dtype))
        try:
            return original_generate(model, *args, **kwargs)
        finally:
            hook.remove()

    def kd_on_generated(self, student, teacher, scored, *args, **kwargs):
        scored_batches.append({key: value.clone() for key, value in scored.items()})
        return original_kd(self, student, teacher, scored, *args, **kwargs)

    monkeypatch.setattr(on_policy, "generate", generate)
    monkeypatch.setattr(on_policy.OnPolicy, "kd_on_generated", kd_on_generated)
    out = tmp_path / "bf16"
    assert main([*distill_args(tiny_world, pruned, out, steps=1), "--precision", "bf16",
                 "--batch-size", "2", "--on-policy", "1", "--gen-temperature", "0",
                 "--gen-tokens", "6", "--prompt-tokens", "10"]) == 0
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert record["on_policy"] == 1 and record["generated_tokens"] > 0
    assert head_dtypes and set(head_dtypes) == {torch.bfloat16}

    vocab = len(AutoTokenizer.from_pretrained(pruned))
    student = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world / "teacher",
                                                   dtype=torch.bfloat16).eval()
    scored = scored_batches[0]
    inputs = {"input_ids": scored["input_ids"], "position_ids": scored["position_ids"]}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        log_q = student(**inputs).logits.float()[..., :vocab].log_softmax(-1)
        log_p = teacher(**inputs).logits.float()[..., :vocab].log_softmax(-1)
    counted = scored["labels"] != IGNORE_INDEX
    assert int(counted.sum()) == record["generated_tokens"]
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)[counted].mean().item()
    assert record["loss"] == pytest.approx(expected, rel=1e-2)


def test_bad_on_policy_inputs(tiny_world, pruned, tmp_path, capsys):
    not_a_cache = tmp_path / "not_a_cache"
    not_a_cache.mkdir()
    cases = [
        (["--on-policy", "1.5"], "--on-policy 1.5 must be in [0, 1]"),
        (["--on-policy", "-0.5"], "--on-policy -0.5 must be in [0, 1]"),
        (["--on-policy", "1", "--gen-tokens", "0"], "--gen-tokens must be at least 1"),
        (["--on-policy", "1", "--gen-tokens", "250"],
         "--prompt-tokens 16 + --gen-tokens 250 exceed the student's 256 positions"),
        (["--on-policy", "1", "--prompt-tokens", "0"], "--prompt-tokens must be in [1, "),
        (["--on-policy", "1", "--prompt-tokens", "33"], "--prompt-tokens must be in [1, "),
        (["--on-policy", "0.5", "--loss", "topk", "--teacher-cache", not_a_cache],
         "the cache cannot score new text"),
        (["--on-policy", "1", "--gen-top-p", "0"], "--gen-top-p 0.0 must be in (0, 1]"),
        (["--on-policy", "1", "--gen-top-p", "1.5"], "--gen-top-p 1.5 must be in (0, 1]"),
        (["--on-policy", "1", "--gen-temperature", "-1"], "--gen-temperature must be >= 0"),
        (["--seq-kd"], "--seq-kd needs --on-policy > 0"),
        (["--on-policy", "1", "--hidden-weight", "1"], "--on-policy with --hidden-weight"),
        (["--on-policy", "0.5", "--compile"], "--compile with --on-policy would recompile"),
    ]
    capsys.readouterr()
    out = tmp_path / "out"
    for extra, message in cases:
        code, _, err = run_cli([*distill_args(tiny_world, pruned, out), *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, lines)
        assert not out.exists() and not (tmp_path / "out.run").exists(), extra
