"""On-policy distillation (GKD, Agarwal et al. 2024), shared by `distill` and `sft --teacher`:
on a lambda fraction of optimizer steps the student continues the micro-batch's prompts by
sampling, the teacher scores prompt + continuation, and the KD loss runs on the generated tokens
only (docs/losses.md, "On-policy distillation").

- `is_on_policy_step(seed, step, lam)`: which steps generate, a pure function of (seed, step).
- `sampling_generator(seed, step, rank, micro, device)`: the torch.Generator a micro-batch
  samples with, seeded from that key alone. Neither draws from the global torch RNG, so a run
  resumed from the step in its checkpoint samples exactly what the uninterrupted run sampled.
- `sample_next`: greedy (temperature 0), temperature and nucleus (top-p) sampling; pure.
- `generate`: batched generation with the KV cache under no_grad, left-padded prompts.
- `scoring_batch`: prompt + generation as right-padded rows, labels on generated tokens only.
- `OnPolicy`: a run's generation settings and the loop's step hook (training/loop.py `train`):
  it knows the optimizer step, times the step's generation and teacher forward, and computes
  the loss of a generating micro-batch (`kd_on_generated`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima_cli.losses import IGNORE_INDEX, TopK, distillation_loss

# keys of the seeded streams ([seed, TAG, ...]), apart from the data's (data/seeds.py: 1-12)
STEP_TAG, SAMPLING_TAG = 21, 22


def is_on_policy_step(seed: int, step: int, lam: float) -> bool:
    """Whether optimizer step `step` (0-based) generates: a uniform draw in [0, 1) keyed by
    (seed, step) below `lam`. lam 0: never; lam 1: always; no state to checkpoint."""
    if lam <= 0:
        return False
    if lam >= 1:
        return True
    return bool(np.random.default_rng([seed, STEP_TAG, step]).random() < lam)


def sampling_generator(seed: int, step: int, rank: int, micro: int,
                       device: torch.device | str = "cpu") -> torch.Generator:
    """The generator micro-batch `micro` of step `step` on rank `rank` samples with."""
    key = int(np.random.default_rng([seed, SAMPLING_TAG, step, rank, micro]).integers(2**62))
    return torch.Generator(device=device).manual_seed(key)


def sample_next(logits: torch.Tensor, generator: torch.Generator | None, temperature: float,
                top_p: float) -> torch.Tensor:
    """One token per row of `logits` [B, V]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the nucleus: the most likely tokens whose mass
    reaches `top_p` (the most likely one always kept), renormalised."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    # a token is outside the nucleus when the mass before it already reaches top_p
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    choice = torch.multinomial(sorted_probs.masked_fill_(outside, 0), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: torch.Tensor,
             attention_mask: torch.Tensor | None, *, max_new_tokens: int, temperature: float,
             top_p: float, generator: torch.Generator | None, eos_ids: Sequence[int],
             synced: bool, vocab_size: int | None = None,
             pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue the left-padded `prompt_ids` [B, P] (`attention_mask` 1 on real tokens; None:
    no padding) by up to `max_new_tokens` tokens each, sampled from the first `vocab_size`
    logits (the tokenizer's real vocabulary). Returns (ids [B, n], mask [B, n]): the mask is
    True on real generated tokens, through the first stop token of `eos_ids`; later positions
    hold `pad_id`. Generation stops early once every row has stopped, except when `synced`:
    under ZeRO-3 each forward gathers weights with collectives, so every rank must run the same
    number of them (exactly `max_new_tokens`).

    A hand-written loop: one prefill with the cache, then one token at a time. The model is put
    in eval mode (no dropout) and back in its previous mode after. A model compiled with
    --compile runs eagerly here: the cache grows every token, and each new shape would be
    another compilation."""
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            return _generate(model, prompt_ids, attention_mask, max_new_tokens, temperature,
                             top_p, generator, eos_ids, synced, vocab_size, pad_id)
    finally:
        model.train(was_training)


def _generate(model, prompt_ids, attention_mask, max_new_tokens, temperature, top_p, generator,
              eos_ids, synced, vocab_size, pad_id):
    batch, device = prompt_ids.shape[0], prompt_ids.device
    padded = attention_mask is not None and not bool(attention_mask.all())
    extra: dict[str, torch.Tensor] = {}
    if padded:
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # real tokens from 0, as HF generate
        extra = {"attention_mask": mask, "position_ids": positions}
        next_position = positions[:, -1:] + 1
    out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **extra)
    # recent transformers 5 releases name the KV cache `cache` (`past_key_values` deprecated)
    cache_name = ("cache" if "cache" in inspect.signature(model.forward).parameters
                  else "past_key_values")
    stops = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    tokens, real = [], []
    for index in range(max_new_tokens):
        token = sample_next(out.logits[:, -1, :vocab_size], generator, temperature, top_p)
        token = torch.where(alive, token, pad_id)
        tokens.append(token)
        real.append(alive)
        alive = alive & ~torch.isin(token, stops)
        if index == max_new_tokens - 1 or (not synced and not bool(alive.any())):
            break
        if padded:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            extra = {"attention_mask": mask, "position_ids": next_position}
            next_position = next_position + 1
        out = model(input_ids=token[:, None], use_cache=True,
                    **{cache_name: getattr(out, cache_name)}, **extra)
    return torch.stack(tokens, 1), torch.stack(real, 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, longest], attention mask), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def scoring_batch(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None,
                  gen_ids: torch.Tensor, gen_mask: torch.Tensor,
                  pad_id: int) -> dict[str, torch.Tensor]:
    """What the teacher and the student score: each row's real prompt tokens then its real
    generated tokens, right-padded (the padding gets its own position run 0, 1, ..., so the
    packed-sequence mask keeps it apart, as in sft's batches). `labels` hold the next token on
    positions whose next token was generated (prompt, padding and anything after a stop token
    get IGNORE_INDEX): the loss counts generated tokens only. Also `tokens`: real generated
    tokens, and `sequence_tokens`: real prompt + generated tokens (what the step trains on)."""
    batch, width_p = prompt_ids.shape
    device = prompt_ids.device
    prompt_lens = (prompt_mask.sum(-1) if prompt_mask is not None
                   else torch.full((batch,), width_p, device=device)).long()
    gen_lens = gen_mask.sum(-1).long()
    lengths = prompt_lens + gen_lens
    width = int(lengths.max())
    full = torch.cat([prompt_ids, gen_ids], 1)
    at = torch.arange(width, device=device)
    real = at[None, :] < lengths[:, None]
    # row r's real tokens start at column width_p - prompt_lens[r] of `full`
    source = (width_p - prompt_lens)[:, None] + at[None, :]
    input_ids = torch.where(real, full.gather(1, source.clamp_(max=full.shape[1] - 1)), pad_id)
    positions = torch.where(real, at[None, :], at[None, :] - lengths[:, None])
    targets = torch.cat([input_ids[:, 1:], input_ids.new_full((batch, 1), pad_id)], 1)
    counted = (at[None, :] >= prompt_lens[:, None] - 1) & (at[None, :] < lengths[:, None] - 1)
    labels = torch.where(counted, targets, IGNORE_INDEX)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels,
            "tokens": gen_lens.sum(), "sequence_tokens": lengths.sum()}


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP or DeepSpeed wrapper (generation calls it directly: ZeRO-3's
    hooks sit on the module and gather its weights there too)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


class OnPolicy:
    """A run's on-policy settings and the training loop's step hook.

    The loop calls `begin_step(step)` before each optimizer step and adds `end_step(step_s)`
    to the step's log record: `on_policy` (0/1), `generate_s`, `teacher_s` and `student_s`
    (the rest of the step: the student's forward and backward, the loss, the update) and
    `generated_tokens` (over all ranks). The loss functions ask `generating()` and call
    `rollout` and `kd_on_generated`; they time the teacher's forward with `timed("teacher")`.
    """

    def __init__(self, options: Any, *, seed: int, rank: int, world_size: int,
                 device: torch.device, synced: bool, eos_ids: Sequence[int], pad_id: int,
                 vocab_size: int, unwrap: Callable[[torch.nn.Module], torch.nn.Module]):
        self.options, self.seed, self.rank = options, seed, rank
        self.world_size, self.device, self.synced = world_size, torch.device(device), synced
        self.eos_ids, self.pad_id, self.vocab_size = list(eos_ids), pad_id, vocab_size
        self.unwrap = unwrap
        # the split is shown on the progress bar only when the run generates
        self.bar_keys = ("generate_s", "teacher_s", "student_s") if options.on_policy > 0 else ()
        self.begin_step(0)

    @classmethod
    def for_session(cls, config: Any, session: Any, *, eos_ids: Sequence[int], pad_id: int,
                    vocab_size: int) -> OnPolicy:
        """The hook of a run of `config` (OnPolicyOptions with a seed) in a training session:
        its rank, world, device and model wrapper; ZeRO-3 generates in step across ranks."""
        return cls(config, seed=config.seed, rank=session.rank, world_size=session.world_size,
                   device=session.device, synced=session.deepspeed_stage == 3,
                   eos_ids=eos_ids, pad_id=pad_id, vocab_size=vocab_size,
                   unwrap=session.unwrap)

    # ------------------------------------------------------------------ the loop's step hook
    def begin_step(self, step: int) -> None:
        self.step, self.micro = step, 0
        self.on_policy = is_on_policy_step(self.seed, step, self.options.on_policy)
        self.seconds = {"generate": 0.0, "teacher": 0.0}
        self.events: list[tuple[str, Any, Any]] = []
        # [generated, scored sequence tokens] of this step on this rank
        self.counts = torch.zeros(2, dtype=torch.long, device=self.device)

    def end_step(self, step_s: float) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize(self.device)
            for part, start, end in self.events:
                self.seconds[part] += start.elapsed_time(end) / 1000
        counts = self.counts
        if self.on_policy and self.world_size > 1 and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)  # every rank decides the same steps
        generated, sequence_tokens = (int(n) for n in counts)
        spent = self.seconds["generate"] + self.seconds["teacher"]
        return {"on_policy": int(self.on_policy), "generate_s": self.seconds["generate"],
                "teacher_s": self.seconds["teacher"], "student_s": max(0.0, step_s - spent),
                "generated_tokens": generated,
                # a generating step trains on prompt + generation, not --seq-len blocks: the
                # loop counts these tokens for the step's tokens/s and MFU
                **({"step_tokens": sequence_tokens} if self.on_policy else {})}

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the block's time to `part`: CUDA events on a GPU (read at the step's end, no
        extra synchronisation), wall time elsewhere."""
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.events.append((part, start, end))
            return
        began = time.perf_counter()
        yield
        self.seconds[part] += time.perf_counter() - began

    # ------------------------------------------------------------------ the loss functions' side
    def generating(self) -> bool:
        """Whether the current step generates (the same answer for all its micro-batches)."""
        return self.on_policy

    def rollout(self, student: torch.nn.Module, teacher: torch.nn.Module | None,
                prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Generate from the prompts (the student, or the teacher with --seq-kd) and return the
        `scoring_batch`. Each call is the step's next micro-batch (its sampling key)."""
        options = self.options
        author = teacher if options.seq_kd else student
        # a sampling generator lives where the logits are (CUDA generators on a GPU)
        generator = sampling_generator(self.seed, self.step, self.rank, self.micro,
                                       prompt_ids.device)
        self.micro += 1
        with self.timed("generate"):
            model = self.unwrap(author) if author is student else plain_module(author)
            gen_ids, gen_mask = generate(
                model, prompt_ids, prompt_mask, max_new_tokens=options.gen_tokens,
                temperature=options.gen_temperature, top_p=options.gen_top_p,
                generator=generator, eos_ids=self.eos_ids, synced=self.synced,
                vocab_size=self.vocab_size, pad_id=self.pad_id)
        scored = scoring_batch(prompt_ids, prompt_mask, gen_ids, gen_mask, self.pad_id)
        self.counts += torch.stack([scored.pop("tokens"), scored.pop("sequence_tokens")])
        return scored

    def kd_on_generated(self, student: torch.nn.Module, teacher: torch.nn.Module,
                        scored: dict[str, torch.Tensor], kd: Any,
                        topk: Callable[[torch.Tensor], TopK] | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a generating micro-batch: the KD divergence of `kd` (KDOptions) between
        teacher and student on the generated tokens, alpha 0 (a CE on the student's own samples
        would reinforce them); `ce` is logged, not trained on. `topk` turns teacher logits into
        a TopK for --loss topk."""
        inputs = {"input_ids": scored["input_ids"], "position_ids": scored["position_ids"],
                  "use_cache": False}
        with self.timed("teacher"), torch.no_grad():
            target = teacher(**inputs).logits
        if topk is not None:
            target = topk(target)
        logits = student(**inputs).logits
        loss, parts = distillation_loss(
            logits, target, scored["labels"], alpha=0.0, kind=kd.loss, topk_mode=kd.topk_mode,
            temperature=kd.temperature, beta=kd.beta, vocab_size=self.vocab_size)
        return loss, {"ce": parts["ce"], "kd": parts["kd"]}


def log_totals(log: Path) -> dict[str, int]:
    """The manifest's on-policy figures, summed over a run's log.jsonl (which a resumed run has
    truncated to its checkpoint and continued, so they are exact across resumes)."""
    steps = tokens = 0
    for line in log.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            steps += int(record.get("on_policy", 0))
            tokens += int(record.get("generated_tokens", 0))
    return {"on_policy_steps": steps, "generated_tokens": tokens}
