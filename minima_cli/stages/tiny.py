"""The tiny world: a synthetic corpus, tokenizer and small LLaMA teacher built on CPU in seconds.

Tests, the demo and the benchmarks use it instead of a hub model. The corpus has learnable
structure (a fact table about invented entities, arithmetic with number words, counting, and a
small grammar), so a ~200k-parameter model's loss drops clearly within a couple of hundred steps
(about 6.3 -> 1.4 with the defaults), and pruning or distilling it has a measurable effect.
Its evaluation sets (multiple choice and chat, `make_mc_sets` / `make_chat_sets`) make
`minima eval` meaningful offline.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from minima_cli.data.pack import pack_documents
from minima_cli.data.tiny_corpus import (
    EOS,
    EOS_ID,
    IM_END,
    IM_START,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    make_chat_sets,
    make_corpus,
    make_facts,
    make_mc_sets,
)
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.errors import MinimaError
from minima_cli.model.checkpoint import quiet_transformers
from minima_cli.progress import step_progress
from minima_cli.runtime import torch_threads
from minima_cli.stages import RunControl
from minima_cli.stages.configs import TinyConfig
from minima_cli.training.loop import LocalSession, optimizer_step
from minima_cli.training.state import adamw, check_clip, evaluate_loss, lr_factor, parameter_groups


def train_tokenizer(
    texts: list[str], vocab_size: int = 512, *, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` with the `tokenizers` library.

    `<|endoftext|>` is bos, eos and unk (id 0); `<|pad|>` is pad (id 1); `<|im_start|>` and
    `<|im_end|>` are reserved for chat formatting.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text (not only the corpus's letters) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(
    vocab_size: int,
    *,
    gqa: bool = True,
    tied: bool = True,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    ffn_size: int = 176,
    max_positions: int = 256,
    bos_token_id: int = EOS_ID,
    eos_token_id: int = EOS_ID,
    pad_token_id: int = PAD_ID,
) -> LlamaConfig:
    """A small `LlamaConfig`; with `gqa` there are half as many kv heads as query heads."""
    if hidden_size % num_heads:
        raise MinimaError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if gqa and num_heads % 2:
        raise MinimaError(f"gqa halves the kv heads, so num_heads must be even, got {num_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=ffn_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2 if gqa else num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tied,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Plain next-token cross-entropy: pre-training's loss function for the shared step."""
    return model(input_ids=batch, labels=batch).loss, {}


def pretrain(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    clip: float = 1.0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> list[float]:
    """Train `model` as a causal LM on random `blocks` rows; returns the loss of every step.

    The optimizer step every training stage takes (training/loop.py `optimizer_step`) on
    `device` in `precision` (bf16: autocast): AdamW (betas 0.9/0.95, weight decay 0.1 on matrices
    only), 10 % linear warmup then cosine decay to 0.1 x `lr`, gradient clipping at `clip`
    (0: none). Batches come from a seeded CPU generator, so the losses are reproducible on one
    machine. Leaves the model on `device`, in eval mode.
    """
    if blocks.ndim != 2 or len(blocks) == 0:
        raise MinimaError(
            f"pretrain needs a non-empty [n_blocks, seq_len] tensor, got {blocks.shape}"
        )
    check_clip(clip)
    session = LocalSession(precision, device)
    # PyTorch's default AdamW kernel, not minima's fused one: the tiny world's teacher (and so
    # the demo's numbers) is pinned bitwise to it, and the fused kernel rounds differently.
    optimizer = adamw(parameter_groups(model, weight_decay=0.1), lr, fused=False)
    model, optimizer = session.prepare(model, optimizer)
    warmup = max(1, steps // 10)
    generator = torch.Generator().manual_seed(seed)

    losses = []
    model.train()
    try:
        with step_progress("pretrain", steps, enabled=progress, loss=float("nan")) as bar:
            for step in range(steps):
                batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
                # lr x factor, as torch's LambdaLR rounds it (not learning_rate's warmup rounding)
                step_lr = lr * lr_factor(step, total_steps=steps, warmup_steps=warmup,
                                         schedule="cosine", min_ratio=0.1)
                stats = optimizer_step(session, model, optimizer, lm_loss, [batch],
                                       grad_accum=1, lr=step_lr, clip=clip)
                losses.append(stats.losses[0])
                bar.update(batch.numel(), loss=losses[-1])
    finally:
        model.eval()
    return losses


def build_tiny_world(
    output_dir: Path,
    *,
    seed: int = 0,
    gqa: bool = True,
    tied: bool = True,
    n_documents: int = 2000,
    steps: int = 200,
    seq_len: int = 64,
    progress: bool = False,
) -> dict:
    """Build corpus, tokenizer and a pretrained tiny teacher into the existing `output_dir`.

    Writes `teacher/` (HF model + tokenizer + generation config, safetensors), `data/train.txt`
    and `data/valid.txt` (one document per line; valid is ~5 % held out), `data/facts.jsonl`,
    the multiple-choice sets `data/eval_mc.jsonl` and `data/eval_facts_mc.jsonl` with their
    `_dev` shots (`make_mc_sets`), and chat data `data/chat_train.jsonl` / `chat_eval.jsonl`
    (`make_chat_sets`). Returns a JSON-able summary for the caller's manifest.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise MinimaError(f"output directory {output_dir} does not exist")
    if n_documents < 2:
        raise MinimaError(f"n_documents must be at least 2 (train and valid), got {n_documents}")
    started = time.perf_counter()

    facts = make_facts(seed)
    documents = make_corpus(n_documents, seed, facts=facts)
    n_valid = max(1, round(0.05 * n_documents))
    train_docs, valid_docs = documents[:-n_valid], documents[-n_valid:]

    # Positions beyond seq_len leave room for prompts longer than a training block later.
    max_positions = max(256, seq_len)
    tokenizer = train_tokenizer(train_docs, model_max_length=max_positions)
    eos_id = tokenizer.eos_token_id
    train_blocks = pack_documents(tokenize_documents(tokenizer, train_docs), seq_len, eos_id)
    valid_ids = tokenize_documents(tokenizer, valid_docs)
    # A small corpus may hold out less than one block: then score it as one shorter block.
    valid_len = min(seq_len, sum(len(ids) + 1 for ids in valid_ids))
    valid_blocks = pack_documents(valid_ids, valid_len, eos_id)

    config = tiny_llama_config(
        len(tokenizer),
        gqa=gqa,
        tied=tied,
        max_positions=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch_threads(1):
        # CPU and fp32 on every machine: the same teacher everywhere, bitwise on one machine
        losses = pretrain(model, train_blocks, steps=steps, seed=seed, device="cpu",
                          precision="fp32", progress=progress)
        valid_loss = evaluate_loss(model, valid_blocks)

    teacher_dir = output_dir / "teacher"
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=32,
    )
    with quiet_transformers():
        model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    data_dir = output_dir / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "train.txt").write_text("".join(d + "\n" for d in train_docs), encoding="utf-8")
    (data_dir / "valid.txt").write_text("".join(d + "\n" for d in valid_docs), encoding="utf-8")
    (data_dir / "facts.jsonl").write_text(
        "".join(json.dumps(f) + "\n" for f in facts), encoding="utf-8"
    )
    eval_sets = {**make_mc_sets(facts, seed), **make_chat_sets(facts, seed)}
    for name, rows in eval_sets.items():
        (data_dir / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
        )

    tail = losses[-10:]  # one step's loss is noisy: report the mean of the last ten
    return {
        "teacher": str(teacher_dir),
        "train": str(data_dir / "train.txt"),
        "valid": str(data_dir / "valid.txt"),
        "facts": str(data_dir / "facts.jsonl"),
        **{name: str(data_dir / f"{name}.jsonl") for name in eval_sets},
        "seed": seed,
        "gqa": gqa,
        "tied": tied,
        "n_train_documents": len(train_docs),
        "n_valid_documents": len(valid_docs),
        "n_facts": len(facts),
        "vocab_size": len(tokenizer),
        "seq_len": seq_len,
        "train_tokens": train_blocks.numel(),
        "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "initial_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "valid_loss": valid_loss,
        "valid_perplexity": math.exp(valid_loss),
        "seconds": round(time.perf_counter() - started, 2),
    }


def run(config: TinyConfig, control: RunControl) -> dict[str, Any]:
    """`minima tiny`: the tiny world into config.output, atomically, with its manifest."""
    from minima_cli.fsutil import atomic_output_dir, write_manifest

    output = Path(config.output)
    with atomic_output_dir(output, force=control.force) as tmp:
        summary = build_tiny_world(tmp, seed=config.seed, gqa=config.gqa, tied=config.tied,
                                   n_documents=config.documents, steps=config.steps,
                                   progress=control.progress)
        summary = {k: (v.replace(str(tmp), str(output)) if isinstance(v, str) else v)
                   for k, v in summary.items()}
        settings = {k: getattr(config, k) for k in ("seed", "gqa", "tied", "steps", "documents")}
        return write_manifest(tmp, "tiny", config=settings, metrics=summary,
                              wall_time_s=summary["seconds"])
