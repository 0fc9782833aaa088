"""`minima score`: expressive scores of heads, kv groups, FFN neurons, hidden dims and layers.

grad (default, MiniMA): S(m) = (1/N) sum_batches |dL/dm| at m = 1 (first-order Taylor importance
of removing the unit), with only the masks requiring grad, so a batch costs one forward and an
activation-only backward.
activation (Minitron): mean activation magnitude at each unit (head context L2 norm, |neuron|,
|residual RMSNorm output| per dim) and, for layers, Block Influence 1 - cos(h_in, h_out).

Raw scores and per-layer L2-normalised scores (hidden and layers by their own L2 norm) are saved;
normalised scores are what compete across layers.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minima_cli.data.pack import pack_documents
from minima_cli.data.read import read_documents
from minima_cli.data.sources import DataSource, source_fingerprint
from minima_cli.data.store import is_store, sample_store_blocks
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.errors import MinimaError
from minima_cli.fsutil import atomic_output_dir, check_output, read_manifest, write_manifest
from minima_cli.model.arch import ModelShape, decoder_layers, residual_norms, shape_from_config
from minima_cli.model.checkpoint import load_config, load_model, model_fingerprint, resolve_model
from minima_cli.model.masks import AXES, Masks, masked
from minima_cli.model.scores import save_scores
from minima_cli.progress import console, step_progress
from minima_cli.runtime import rank_and_world
from minima_cli.stages import RunControl
from minima_cli.stages.configs import DEFAULT_SEQ_LEN, ScoreConfig, resolve_seq_len

METHODS = ("grad", "activation")


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 at least (fp64 stays fp64, for exact checks)."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())


def gradient_scores(
    model: nn.Module,
    shape: ModelShape,
    batches: Iterable[torch.Tensor],
    on_batch: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Mean absolute gradient of the LM loss w.r.t. every mask at 1; returns (scores, mean loss).
    Parameters are frozen for the duration (restored after)."""
    device = next(model.parameters()).device
    masks = Masks.ones(shape, requires_grad=True).to(device)
    mask_list = list(masks.as_dict().values())
    totals = [torch.zeros_like(m, dtype=torch.float64) for m in mask_list]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    count, loss_sum = 0, 0.0
    try:
        with masked(model, masks, shape):
            for batch in batches:
                batch = batch.to(device)
                loss = lm_loss(model(input_ids=batch).logits, batch)
                grads = torch.autograd.grad(loss, mask_list)
                for total, grad in zip(totals, grads, strict=True):
                    total += grad.abs().double()
                count += 1
                loss_sum += loss.item()
                if on_batch:
                    on_batch(batch.numel(), loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    totals, count, loss_sum = all_reduce_sums(totals, count, loss_sum)
    if count == 0:
        raise MinimaError("no batches to score")
    scores = {axis: (t / count).float().cpu() for axis, t in zip(AXES, totals, strict=True)}
    return scores, loss_sum / count


@torch.no_grad()
def activation_scores(
    model: nn.Module,
    shape: ModelShape,
    batches: Iterable[torch.Tensor],
    on_batch: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Minitron-style activation magnitudes, token-averaged; returns (scores, mean loss)."""
    L = shape.layers
    device = next(model.parameters()).device
    sums = {
        "heads": torch.zeros(L, shape.heads, dtype=torch.float64, device=device),
        "ffn": torch.zeros(L, shape.ffn, dtype=torch.float64, device=device),
        "hidden": torch.zeros(shape.hidden, dtype=torch.float64, device=device),
        "layers": torch.zeros(L, dtype=torch.float64, device=device),
    }

    def per_token(x: torch.Tensor) -> torch.Tensor:  # sum over batch and positions, in fp64
        return x.flatten(0, -2).sum(0, dtype=torch.float64)

    def on_heads(layer):
        def hook(module, args):
            context = args[0].unflatten(-1, (shape.heads, shape.head_dim))
            sums["heads"][layer] += per_token(context.float().norm(dim=-1))

        return hook

    def on_neurons(layer):
        def hook(module, args):  # must return None: a pre-hook's return value replaces the input
            sums["ffn"][layer] += per_token(args[0].abs())

        return hook

    def on_norm(module, args, output):
        sums["hidden"].add_(per_token(output.abs()))

    def on_layer(layer):
        def hook(module, args, output):
            h_out = output[0] if isinstance(output, tuple) else output
            cosine = torch.cosine_similarity(args[0].float(), h_out.float(), dim=-1)
            sums["layers"][layer] += (1 - cosine).double().sum()

        return hook

    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(index)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_neurons(index)))
        handles.append(layer.register_forward_hook(on_layer(index)))
    handles += [norm.register_forward_hook(on_norm) for norm in residual_norms(model)]
    tokens, count, loss_sum = 0, 0, 0.0
    try:
        for batch in batches:
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch).loss
            tokens += batch.numel()
            count += 1
            loss_sum += loss.item()
            if on_batch:
                on_batch(batch.numel(), loss.item())
    finally:
        for handle in handles:
            handle.remove()
    totals, count, loss_sum = all_reduce_sums(list(sums.values()), count, loss_sum)
    if count == 0:
        raise MinimaError("no batches to score")
    tokens = tokens * (dist.get_world_size() if dist.is_initialized() else 1)
    scores = {axis: (t / tokens).float().cpu() for axis, t in zip(sums, totals, strict=True)}
    # A kv group is as important as its query heads together.
    scores["kv_groups"] = scores["heads"].view(L, shape.kv_heads, shape.group_size).sum(-1)
    return {axis: scores[axis] for axis in AXES}, loss_sum / count


def all_reduce_sums(
    totals: list[torch.Tensor], count: int, loss_sum: float
) -> tuple[list[torch.Tensor], int, float]:
    """Under data parallelism every rank scored its own shard: sum the accumulators."""
    if not (dist.is_available() and dist.is_initialized()):
        return totals, count, loss_sum
    for total in totals:
        dist.all_reduce(total)
    scalars = torch.tensor([count, loss_sum], dtype=torch.float64, device=totals[0].device)
    dist.all_reduce(scalars)
    return totals, int(scalars[0].item()), float(scalars[1].item())


def check_finite_scores(scores: dict[str, torch.Tensor], mean_loss: float) -> None:
    """Scores with NaN or inf would rank units arbitrarily in prune: refuse to write them."""
    if not math.isfinite(mean_loss):
        raise MinimaError(f"the model's loss on the data is {mean_loss}: its weights (or "
                          "--dtype) give non-finite values, no scores written")
    for axis, values in scores.items():
        if not bool(torch.isfinite(values).all()):
            raise MinimaError(f"the {axis} scores are not finite (the model overflows in its "
                              "dtype?): no scores written")


def score_blocks(
    tokenizer: Any, documents: list[str], seq_len: int, n_blocks: int, seed: int
) -> torch.Tensor:
    """Tokenise the documents, pack them into seq_len blocks and take a seeded sample."""
    if tokenizer.eos_token_id is None:
        raise MinimaError("the tokenizer has no EOS token to separate documents")
    blocks = pack_documents(tokenize_documents(tokenizer, documents), seq_len,
                            tokenizer.eos_token_id)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[order[:n_blocks]]


def init_distributed() -> tuple[int, int]:
    """(rank, world size): joins the process group when launched by torchrun, else (0, 1)."""
    if rank_and_world()[1] > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def finish_barrier(world: int) -> Iterator[None]:
    """Rank 0 joins the other ranks' barrier once its output is renamed into place."""
    try:
        yield
    finally:
        if world > 1:
            dist.barrier()


def run_score(
    *,
    model_path: str,
    data: str,
    output: Path,
    batches: int = 16,
    seq_len: int | None = None,
    batch_size: int = 4,
    method: str = "grad",
    text_field: str = "text",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Score `model_path` on `data` into `output` (scores.safetensors + minima.json).
    `seq_len` None: the smaller of 512 and the model's positions (configs.resolve_seq_len).
    The manifest's metrics carry the model FLOPs per token, TFLOP/s and MFU against
    `peak_tflops` (default: flops.resolve_peak's)."""
    from minima_cli.model.checkpoint import load_tokenizer
    from minima_cli.training.config import check_peak
    from minima_cli.training.flops import Throughput, resolve_peak, score_flops_per_token

    check_peak(peak_tflops)

    if method not in METHODS:
        raise MinimaError(f"unknown method {method!r}: choose {' or '.join(METHODS)}")
    for name, value in (("batches", batches), ("batch-size", batch_size)):
        if value <= 0:
            raise MinimaError(f"--{name} must be positive, got {value}")
    if seq_len is not None and seq_len < 2:  # one token has no next token: the loss is NaN
        raise MinimaError(f"--seq-len must be at least 2 (a next-token loss needs two tokens), "
                          f"got {seq_len}")
    check_output(output, force)
    source = resolve_model(model_path)
    # cheap checks before the slow loads; a token store is read memory-mapped (data/store.py)
    documents = None if is_store(data) else read_documents(data, text_field)
    config = load_config(source)
    shape = shape_from_config(config)
    auto_seq_len = seq_len is None
    seq_len = resolve_seq_len(seq_len, getattr(config, "max_position_embeddings", None))
    if auto_seq_len and rank_and_world()[0] == 0:
        console.print(f"[dim]--seq-len {seq_len} (default: the smaller of {DEFAULT_SEQ_LEN} and "
                      "the model's positions)[/dim]")
    blocks = (sample_store_blocks(data, load_tokenizer(source), seq_len, batches * batch_size,
                                  seed) if documents is None else
              score_blocks(load_tokenizer(source), documents, seq_len, batches * batch_size, seed))
    rank, world = init_distributed()
    shard = blocks[rank::world]  # under torchrun each rank scores every world-th sequence
    n_batches = -(-len(blocks) // batch_size)
    if device == "auto":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = load_model(source, dtype=dtype).to(device)
    scorer = gradient_scores if method == "grad" else activation_scores
    peak, peak_source = resolve_peak(peak_tflops, device, str(model.dtype).removeprefix("torch."),
                                     [shape], batch_size * seq_len)
    throughput = Throughput(score_flops_per_token(shape, seq_len, method), peak * world,
                            peak_source)

    start = time.perf_counter()
    with step_progress(f"score ({method})", -(-len(shard) // batch_size),
                       enabled=progress and rank == 0, loss=float("nan")) as bar:
        raw, mean_loss = scorer(
            model, shape, shard.split(batch_size),
            on_batch=lambda tokens, loss: bar.update(tokens * world, loss=loss),
        )
    seconds = time.perf_counter() - start
    check_finite_scores(raw, mean_loss)  # every rank holds the same all-reduced sums
    if rank != 0:  # rank 0 writes; the others wait until the output is in place
        dist.barrier()
        return read_manifest(output)
    fingerprint = model_fingerprint(source)
    data_identity = source_fingerprint(DataSource(data, text_field=text_field))
    with finish_barrier(world), atomic_output_dir(output, force=force) as tmp:
        save_scores(tmp, raw, {"model_fingerprint": fingerprint, "method": method})
        return write_manifest(
            tmp,
            "score",
            inputs={
                "model": {"path": str(source), "fingerprint": fingerprint},
                "data": {"source": str(data), "sha256": data_identity, "text_field": text_field},
            },
            config={"method": method, "batches": n_batches, "seq_len": seq_len,
                    "seq_len_auto": auto_seq_len, "batch_size": batch_size, "seed": seed,
                    "dtype": str(model.dtype)},
            model_shape=shape.as_dict(),
            metrics={"tokens": int(blocks.numel()), "mean_loss": mean_loss,
                     "tokens_per_second": blocks.numel() / seconds,
                     **throughput.summary(blocks.numel() / seconds)},
            wall_time_s=seconds,
        )


def run(config: ScoreConfig, control: RunControl) -> dict[str, Any]:
    from minima_cli.runtime import torch_dtype

    return run_score(model_path=config.model, data=config.data, output=Path(config.output),
                     batches=config.batches, seq_len=config.seq_len,
                     batch_size=config.batch_size, method=config.method,
                     text_field=config.text_field, seed=config.seed,
                     dtype=torch_dtype(config.dtype), device=config.device, force=control.force,
                     progress=control.progress, peak_tflops=config.peak_tflops)
