"""Mask variables on a LLaMA-family model, attached with hooks (no fork of the modelling code;
only the residual RMSNorms get their forward swapped for the kept-dims one below).

- `heads[l, a]`   multiplies attention head a's context before `o_proj` (MiniMA's xi),
- `kv_groups[l, g]` multiplies every query head of kv group g the same way (GQA units),
- `ffn[l, i]`     multiplies FFN neuron i, `act(gate) * up`, before `down_proj` (nu),
- `hidden[d]`     multiplies dim d of every write to the residual stream: the embedding output
                  and each `o_proj` / `down_proj` output (zeta),
- `layers[l]`     multiplies both residual branches of layer l (lambda); 0 makes it the identity.

Hidden-dim semantics (MiniMA's): every residual RMSNorm averages over the *kept* dims,
`rms(x) = sqrt(sum_d x_d^2 / sum_d zeta_d)`. With zeta = 1 this is the plain model; with zeta a
0/1 vector it is exactly the model whose hidden dims were sliced away, with no rescaling of norm
weights or eps (which also keeps Qwen3's per-head q/k norms untouched). The full argument, and
what the tests check: docs/masks.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import nn

from minima_cli.model.arch import ModelShape, decoder_layers, residual_norms

AXES = ("heads", "kv_groups", "ffn", "hidden", "layers")


@dataclass
class Masks:
    heads: torch.Tensor  # [layers, heads]
    kv_groups: torch.Tensor  # [layers, kv_heads]
    ffn: torch.Tensor  # [layers, ffn]
    hidden: torch.Tensor  # [hidden]
    layers: torch.Tensor  # [layers]

    @classmethod
    def ones(cls, shape: ModelShape, *, requires_grad: bool = False) -> Masks:
        sizes = {
            "heads": (shape.layers, shape.heads),
            "kv_groups": (shape.layers, shape.kv_heads),
            "ffn": (shape.layers, shape.ffn),
            "hidden": (shape.hidden,),
            "layers": (shape.layers,),
        }
        return cls(
            **{a: torch.ones(s, requires_grad=requires_grad) for a, s in sizes.items()}
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str) -> Masks:
        """Masks on `device`, still leaves of the autograd graph (gradients land on the copies)."""
        return Masks(**{a: t.detach().to(device).requires_grad_(t.requires_grad)
                        for a, t in self.as_dict().items()})


def head_mask(masks: Masks, layer: int, group_size: int) -> torch.Tensor:
    """Per-query-head multiplier of one layer: its own mask times its kv group's."""
    return masks.heads[layer] * masks.kv_groups[layer].repeat_interleave(group_size)


@contextlib.contextmanager
def masked(model: nn.Module, masks: Masks, shape: ModelShape) -> Iterator[None]:
    """Run `model` with `masks` applied; hooks are removed on exit."""
    handles = []

    def scale_output(multiplier):
        return lambda module, args, output: output * multiplier().to(output.dtype)

    def scale_heads(layer):
        def hook(module, args):
            context = args[0].unflatten(-1, (shape.heads, shape.head_dim))
            multiplier = head_mask(masks, layer, shape.group_size).to(context.dtype)
            return (context * multiplier[:, None]).flatten(-2), *args[1:]

        return hook

    def scale_neurons(layer):
        return lambda module, args: (args[0] * masks.ffn[layer].to(args[0].dtype), *args[1:])

    def kept_dims_rms_norm(norm):
        def forward(x):
            x32 = x.float()
            variance = x32.pow(2).sum(-1, keepdim=True) / masks.hidden.sum()
            return norm.weight * (x32 * torch.rsqrt(variance + norm.variance_epsilon)).to(x.dtype)

        return forward

    embed = model.model.embed_tokens
    handles.append(embed.register_forward_hook(scale_output(lambda: masks.hidden)))
    for index, layer in enumerate(decoder_layers(model)):
        residual_write = (lambda i: lambda: masks.hidden * masks.layers[i])(index)
        attention, mlp = layer.self_attn, layer.mlp
        handles.append(attention.o_proj.register_forward_pre_hook(scale_heads(index)))
        handles.append(attention.o_proj.register_forward_hook(scale_output(residual_write)))
        handles.append(mlp.down_proj.register_forward_pre_hook(scale_neurons(index)))
        handles.append(mlp.down_proj.register_forward_hook(scale_output(residual_write)))
    norms = residual_norms(model)
    for norm in norms:  # replaced, not hooked: a hook would compute every norm twice
        norm.forward = kept_dims_rms_norm(norm)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for norm in norms:
            del norm.forward
