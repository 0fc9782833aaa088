"""`minima sft`: supervised fine-tuning on chat data with the loss on assistant tokens only,
optionally distilled from a teacher (distill's losses, on the same tokens).

The data side (record formats, chat templates and the ChatML default, assistant masks, packing,
the resumable row stream) is data/chat.py; the loop, checkpoints and resume are
training/loop.py's. Each micro-batch's loss is weighted by its share of the step's assistant
tokens (docs/losses.md). With `--on-policy LAMBDA` (and a teacher), on that fraction of steps the
student answers each example's prompt (its tokens before the first assistant token) itself and
learns from the teacher on its own answer (training/on_policy.py). Outputs and manifest:
docs/stages.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli.data.chat import (
    CHATML_TEMPLATE,
    IM_END,
    ChatRowStream,
    Example,
    assistant_labels,
    chat_template_of,
    collate,
    encode_conversations,
    fit_examples,
    make_rows,
    missing_chatml_tokens,
    read_chat,
    rows_fingerprint,
    split_conversations,
)
from minima_cli.data.teacher_cache import teacher_topk
from minima_cli.errors import MinimaError
from minima_cli.evaluation.generation import stop_token_ids
from minima_cli.fsutil import write_manifest
from minima_cli.losses import IGNORE_INDEX, TopK, distillation_loss, summed_cross_entropy
from minima_cli.model.arch import shape_from_config
from minima_cli.model.checkpoint import (
    check_same_tokenizer,
    copy_tokenizer_files,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from minima_cli.progress import console
from minima_cli.runtime import rank_and_world
from minima_cli.stages import RunControl
from minima_cli.stages.configs import DEFAULT_SEQ_LEN, SftConfig, resolve_seq_len
from minima_cli.training.loop import (
    load_teacher,
    open_session,
    save_final_model,
    train,
    training_run_dir,
    training_throughput,
)
from minima_cli.training.on_policy import OnPolicy, left_pad, log_totals


def chat_prompts(input_ids: torch.Tensor, labels: torch.Tensor,
                 position_ids: torch.Tensor) -> list[list[int]]:
    """The prompt of every example of a collated batch (`data.chat.collate`): its tokens up to
    and including the one before its first assistant token (the turn opener), i.e. the
    conversation before the first assistant reply. Examples start where the position ids
    restart; a run without labels is padding."""
    prompts = []
    for ids, labs, positions in zip(input_ids.tolist(), labels.tolist(),
                                    position_ids.tolist(), strict=True):
        starts = [t for t, p in enumerate(positions) if p == 0] + [len(ids)]
        for begin, end in itertools.pairwise(starts):
            first = next((t for t in range(begin, end) if labs[t] != IGNORE_INDEX), None)
            if first is not None:
                prompts.append(ids[begin : first + 1])
    return prompts


def longest_prompt(rows: list[list[Example]]) -> int:
    """The longest `chat_prompts` prompt of these rows (each example has an assistant token
    after its first, `fit_examples`)."""
    return max(example.mask.index(True, 1) for row in rows for example in row)


def make_loss_fn(config: SftConfig, teacher: torch.nn.Module | None, vocab_size: int,
                 on_policy: OnPolicy | None = None):
    """`loss_fn(model, batch) -> (loss, parts)`: the mean assistant-token CE, or with a teacher
    distill's `alpha * CE + (1 - alpha) * KD` over the same tokens; times the batch's `share`
    of its step (`token_share`). The parts are this rank's unscaled means. With `on_policy`
    (the run's step hook) its generating steps answer the batch's prompts and take the KD loss
    on the generated tokens, unweighted (each micro-batch's mean); the teacher's forward is
    timed."""
    timed = on_policy.timed if on_policy is not None else None

    def topk(logits: torch.Tensor) -> TopK:
        return TopK(*teacher_topk(logits, config.topk, vocab_size))

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        if on_policy is not None and on_policy.generating():
            prompts = chat_prompts(batch["input_ids"], batch["labels"], batch["position_ids"])
            ids, mask = left_pad(prompts, on_policy.pad_id, batch["input_ids"].device)
            scored = on_policy.rollout(model, teacher, ids, mask)
            return on_policy.kd_on_generated(model, teacher, scored, config,
                                             topk if config.loss == "topk" else None)
        # no KV cache: with one, transformers skips the packed-sequence mask (and it wastes memory)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                  "use_cache": False}
        logits = model(**inputs).logits
        share = batch.get("share", 1.0)
        if teacher is None:
            total, count = summed_cross_entropy(logits, batch["labels"])
            loss = total / max(count, 1)
            return loss * share, {"ce": loss.detach()}
        with timed("teacher") if timed else contextlib.nullcontext(), torch.no_grad():
            target = teacher(**inputs).logits
        if config.loss == "topk":
            target = topk(target)
        loss, parts = distillation_loss(
            logits, target, batch["labels"], alpha=config.alpha, kind=config.loss,
            topk_mode=config.topk_mode, temperature=config.temperature, beta=config.beta,
            vocab_size=vocab_size)
        return loss * share, {"ce": parts["ce"], "kd": parts["kd"]}

    return loss_fn


def make_evaluate_fn(rows: list[list[Example]], batch_size: int, pad_id: int, device: Any):
    """`evaluate_fn(model)`: the held-out examples' mean cross-entropy per assistant token."""

    @torch.no_grad()
    def evaluate_fn(model: torch.nn.Module) -> float:
        model.eval()
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           position_ids=batch["position_ids"].to(device), use_cache=False).logits
            summed, n = summed_cross_entropy(logits, batch["labels"].to(device))
            total, count = total + float(summed), count + n
        return total / max(count, 1)

    return evaluate_fn


@dataclass
class ChatData:
    train_rows: list[list[Example]]
    valid_rows: list[list[Example]]
    summary: dict[str, Any]
    fingerprint: str


def prepare_chat(data: str, tokenizer: Any, template: str, config: SftConfig, *,
                 valid_data: str | None = None, progress: bool = False) -> ChatData:
    """Read, split, encode, fit and (optionally) pack the training and validation examples."""
    conversations, summary = read_chat(data)
    if valid_data is not None:
        train_convs = conversations
        valid_convs, valid_summary = read_chat(valid_data)
        summary["valid"] = valid_summary
    else:
        if not config.valid_fraction:
            raise MinimaError("sft validates on held-out conversations: give --valid-fraction "
                              "> 0 or --valid-data")
        train_idx, valid_idx = split_conversations(len(conversations), seed=config.seed,
                                                   valid_fraction=config.valid_fraction)
        train_convs = [conversations[i] for i in train_idx]
        valid_convs = [conversations[i] for i in valid_idx]
    sets = {}
    for name, convs in (("train", train_convs), ("valid", valid_convs)):
        examples, counts = fit_examples(
            encode_conversations(tokenizer, template, convs, progress=progress), config.seq_len)
        if not examples:
            raise MinimaError(f"no {name} example keeps an assistant token within --seq-len "
                              f"{config.seq_len}")
        rows = make_rows(examples, config.seq_len, config.packing)
        sets[name] = rows
        summary[f"{name}_examples"] = len(examples)
        summary[f"{name}_rows"] = len(rows)
        summary[f"{name}_truncated"], summary[f"{name}_dropped"] = (counts["truncated"],
                                                                    counts["dropped"])
        summary[f"{name}_assistant_tokens"] = assistant_labels(rows)
        summary[f"{name}_tokens"] = sum(len(e.ids) for e in examples)
    fingerprint = rows_fingerprint(sets["train"] + [[]] + sets["valid"],
                                   {"seq_len": config.seq_len, "packing": config.packing})
    summary.update(seq_len=config.seq_len, packing=config.packing, fingerprint=fingerprint)
    return ChatData(sets["train"], sets["valid"], summary, fingerprint)


def run_sft(*, model_path: str, data: str, output: Path, config: SftConfig,
            resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """The teacher and the validation data are the config's (`teacher`, `valid_data`): the
    values its checks judge."""
    config.check()
    run_dir = training_run_dir(output, force=force, resume=resume)
    source = resolve_model(model_path)
    auto_seq_len = config.seq_len is None
    # resolved before anything reads it: the run id, the rows and the manifest hold the number
    config = dataclasses.replace(config, seq_len=resolve_seq_len(
        config.seq_len, getattr(load_config(source), "max_position_embeddings", None)))
    if auto_seq_len and rank_and_world()[0] == 0:
        console.print(f"[dim]--seq-len {config.seq_len} (default: the smaller of "
                      f"{DEFAULT_SEQ_LEN} and the model's positions)[/dim]")
    tokenizer = load_tokenizer(source)
    teacher_src = resolve_model(config.teacher) if config.teacher else None
    if teacher_src is not None and config.loss == "topk" and config.topk > len(tokenizer):
        raise MinimaError(f"--topk {config.topk} exceeds the vocabulary ({len(tokenizer)} "
                          "tokens)")
    if teacher_src is not None:
        check_same_tokenizer(load_tokenizer(teacher_src), tokenizer)
    template, default_template = chat_template_of(tokenizer)
    missing = missing_chatml_tokens(tokenizer) if default_template else []
    if missing and teacher_src is not None:
        raise MinimaError(f"the tokenizer has no chat template and no {' / '.join(missing)} "
                          "tokens for the ChatML default, and with a teacher minima cannot add "
                          "them: give both models a chat template")
    if missing:
        from tokenizers import AddedToken

        # the ids the model will learn (the embeddings grow once the model is loaded)
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    chat = prepare_chat(data, tokenizer, template, config, valid_data=config.valid_data,
                        progress=progress)
    chat.summary["seq_len_auto"] = auto_seq_len
    max_positions = getattr(load_config(source), "max_position_embeddings", None)
    prompt = longest_prompt(chat.train_rows) if config.generates else 0
    if config.generates and max_positions and prompt + config.gen_tokens > max_positions:
        raise MinimaError(f"the longest prompt ({prompt} tokens) + --gen-tokens "
                          f"{config.gen_tokens} exceed the model's {max_positions} positions")
    session = open_session(config)
    config = dataclasses.replace(config, max_steps=config.steps_for(len(chat.train_rows),
                                                                    session.world_size))
    torch.manual_seed(config.seed)
    teacher = None
    if teacher_src is not None:
        teacher = load_teacher(teacher_src, session)
    model = load_model(source)
    if missing and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    stream = ChatRowStream(chat.train_rows, batch_size=config.batch_size, pad_id=pad_id,
                           seed=config.seed, rank=session.rank, world_size=session.world_size,
                           fingerprint=chat.fingerprint, grad_accum=config.grad_accum)
    run_id = {"config": config.fingerprint(), "data": chat.fingerprint,
              "model": model_fingerprint(source),
              "teacher": model_fingerprint(teacher_src) if teacher_src else None}
    throughput = training_throughput(
        session, config, shape_from_config(model.config),
        shape_from_config(load_config(teacher_src)) if teacher_src is not None else None)
    on_policy = OnPolicy.for_session(config, session, eos_ids=stop_token_ids(tokenizer),
                                     pad_id=pad_id, vocab_size=len(tokenizer))
    result = train(session=session, model=model,
                   loss_fn=make_loss_fn(config, teacher, len(tokenizer), on_policy),
                   stream=stream, valid_blocks=None, config=config, run_dir=run_dir,
                   run_id=run_id, resume=resume, progress=progress, description="sft",
                   evaluate_fn=make_evaluate_fn(chat.valid_rows, config.batch_size, pad_id,
                                                session.device),
                   throughput=throughput, step_hook=on_policy)
    # real tokens (padding excluded): the manifest's MFU counts only useful model FLOPs
    tokens_per_s = (stream.tokens_served - stream.resumed_tokens) / max(result.seconds, 1e-9)

    def write_extra(tmp: Path) -> dict[str, Any]:
        copy_tokenizer_files(source, tmp)
        if missing:
            tokenizer.save_pretrained(tmp)
        if default_template:
            save_chat_template(tmp, tokenizer)
        chat.summary["chat_template"] = "chatml (minima default)" if default_template else \
            "the tokenizer's"
        if missing:
            chat.summary["added_tokens"] = missing
        return write_manifest(
            tmp, "sft",
            inputs={"model": {"path": str(source), "fingerprint": run_id["model"]},
                    "teacher": ({"path": str(teacher_src), "fingerprint": run_id["teacher"]}
                                if teacher_src else None),
                    "data": chat.summary},
            config=asdict(config),
            metrics={**result.metrics, "steps": result.steps,
                     "tokens": stream.tokens_served,  # real tokens, padding excluded
                     "world_size": session.world_size, "precision": session.precision,
                     "tokens_per_s": tokens_per_s, **throughput.summary(tokens_per_s),
                     **log_totals(run_dir / "log.jsonl")},
            wall_time_s=result.seconds)

    return save_final_model(session, result.model, output, force, run_dir, write_extra)


def save_chat_template(directory: Path, tokenizer: Any) -> None:
    """Write minima's ChatML as the model's chat template (`chat_template.jinja`, which
    transformers loads with the tokenizer) and make `<|im_end|>` end generation too."""
    from transformers import GenerationConfig

    (directory / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    try:
        generation = GenerationConfig.from_pretrained(directory)
    except OSError:
        generation = GenerationConfig()
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for token_id in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)):
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    generation.eos_token_id = eos
    generation.save_pretrained(directory)


def run(config: SftConfig, control: RunControl) -> dict[str, Any] | None:
    return run_sft(model_path=config.model, data=config.data, output=Path(config.output),
                   config=config, resume=control.resume, force=control.force,
                   progress=control.progress)
