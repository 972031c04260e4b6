"""The ``cls_attention`` output: the last block's CLS-query softmax weights over the patch keys.

timm's ``Attention`` runs fused (``F.scaled_dot_product_attention``), which never materialises the
weights, so they are recomputed from the last block's *input* exactly as the unfused path computes
them (``norm1 -> attn.qkv -> q_norm / k_norm -> q * scale @ k^T -> softmax``), for the CLS query
only: ``[N, heads, 1, P + h*w]``. The columns of the prefix tokens (CLS, registers) are dropped, so
each row sums to at most 1; the rest is what CLS gives to the prefix tokens. This is the map DINO's
``visualize_attention.py`` draws (Caron et al. 2021, fig. 1), per head.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from export.errors import ExportUsageError



def last_attention(model: nn.Module) -> nn.Module:
    """The last block's timm ``Attention`` (with ``qkv``, ``num_heads``, ``head_dim``, ``scale``), or
    ``ExportUsageError`` naming what this model lacks."""
    blocks = list(getattr(model, "blocks", []))
    if not blocks:
        raise ExportUsageError(f"{type(model).__name__} has no blocks: --attention needs a timm ViT")
    block = blocks[-1]
    attn = getattr(block, "attn", None)
    missing = [a for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
               if not hasattr(attn, a)] + [a for a in ("norm1",) if not hasattr(block, a)]
    if missing:
        raise ExportUsageError(f"--attention: the last block ({type(block).__name__}) of {type(model).__name__} "
                               f"has no {', '.join(missing)} (only timm's pre-norm Block with Attention "
                               "is supported)")
    return attn


def attention_heads(model: nn.Module) -> int:
    """Heads of the last block's attention."""
    return int(last_attention(model).num_heads)


def cls_attention(block: nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """``[N, heads, h*w]`` softmax weights of the CLS query (token 0) over the patch keys.

    ``x`` is the block's input ``[N, P + h*w, D]``; the softmax runs over all ``P + h*w`` keys, and
    the ``P`` prefix columns are dropped afterwards.
    """
    attn = block.attn
    y = block.norm1(x)
    n, length, _ = y.shape
    qkv = attn.qkv(y).reshape(n, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])   # [N, heads, L, head_dim]
    q = q[:, :, :1] * attn.scale                        # CLS query only: [N, heads, 1, head_dim]
    weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # [N, heads, 1, L]
    return weights[:, :, 0, num_prefix_tokens:]


@contextlib.contextmanager
def last_block_input(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the last block's input while the ``with`` body runs a forward pass (a list of one tensor)."""
    seen: list[torch.Tensor] = []
    handle = model.blocks[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()
