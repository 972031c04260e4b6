"""Masked autoencoder (MAE) pre-training around a timm ViT encoder.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (arXiv:2111.06377).
The encoder sees only the visible ~25% of patch tokens (no mask tokens); a light decoder gets the
encoded visible tokens plus a shared learned mask token at every masked position and regresses the
(per-patch normalised) pixels of the masked patches. The pure pieces — ``patchify``,
``unpatchify``, ``random_masking``, ``mae_loss``, ``sincos_pos_embed_2d`` — follow the reference
``models_mae.py`` and are tested on their own.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from training.backbone import EncoderSpec


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Cut images ``[N, C, H, W]`` into flattened patches ``[N, L, p*p*C]`` (row-major, (p, p, C) order)."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # [N, gh, gw, p, p, C]
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[N, L, p*p*C]`` -> ``[N, C, gh*p, gw*p]``."""
    n, length, d = x.shape
    gh, gw = grid
    if length != gh * gw or d != p * p * channels:
        raise ValueError(f"patches {tuple(x.shape)} do not match grid {grid}, p={p}, C={channels}")
    x = x.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C, gh, p, gw, p]
    return x.reshape(n, channels, gh * p, gw * p)


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE §3, ``models_mae.random_masking``).

    ``x [N, L, D]`` -> ``x_visible [N, L_keep, D]`` with ``L_keep = int(L * (1 - mask_ratio))``,
    ``mask [N, L]`` (1 = masked, 0 = kept, in the original patch order) and ``ids_restore [N, L]``
    (the permutation that puts the shuffled sequence back in order). ``noise [N, L]`` may be given
    to make the choice deterministic; otherwise it is drawn from ``generator``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device, generator=generator)  # [N, L] in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise values are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]  # [N, L_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return x_visible, mask, ids_restore


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean squared error over masked patches only (MAE §3 "Reconstruction target").

    ``pred``, ``target`` ``[N, L, P]`` (P = p*p*C pixels), ``mask [N, L]`` with 1 = masked. With
    ``norm_pix_loss`` each target patch is normalised by its own mean and variance (the paper's
    "normalized pixels" target, which improves representations). Computed in float32.
    """
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the reference code
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def sincos_pos_embed_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Fixed sine-cosine embedding ``[M, dim]`` of positions ``pos [M]`` (Vaswani et al. 2017)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = pos.double().reshape(-1, 1) * omega.reshape(1, -1)  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding ``[gh*gw, dim]``, half the channels per axis (as MAE uses)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # row-major patches
    emb = torch.cat([sincos_pos_embed_1d(dim // 2, xs.flatten()),
                     sincos_pos_embed_1d(dim // 2, ys.flatten())], dim=1)
    return emb.float()


def _init_mae_weights(module: nn.Module) -> None:
    # MAE initialises linear layers with xavier_uniform (models_mae.py: _init_weights).
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskedAutoencoder(nn.Module):
    """MAE around a timm ``VisionTransformer`` encoder (He et al. 2022).

    ``forward(imgs [N, C, H, W]) -> {"loss": scalar, "pred": [N, L, p*p*C], "mask": [N, L]}``; the
    caller calls ``backward()``. The encoder stays a plain timm model, so its ``state_dict`` is what
    the run directory stores as ``encoder.pt``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        spec: EncoderSpec,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        mae_init: bool = True,
    ) -> None:
        super().__init__()
        if spec.patch_size[0] != spec.patch_size[1]:
            raise ValueError(f"MAE here needs square patches, got {spec.patch_size}")
        missing = [a for a in ("patch_embed", "blocks", "norm_pre", "pos_drop", "norm")
                   if not hasattr(encoder, a)]
        if missing:
            raise ValueError(f"MAE needs a timm VisionTransformer-style encoder; "
                             f"{type(encoder).__name__} lacks {missing}")
        if getattr(encoder, "dynamic_img_size", False):
            raise ValueError("MAE pre-training needs a fixed image size (dynamic_img_size=False)")
        self.encoder = encoder
        self.spec = spec
        self.patch = spec.patch_size[0]
        self.grid = spec.grid_size
        self.num_prefix = int(getattr(encoder, "num_prefix_tokens", 0))
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        d = spec.embed_dim

        self.decoder_embed = nn.Linear(d, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed sin-cos decoder position embedding; prefix tokens get zeros (as MAE's cls slot).
        dec_pos = torch.zeros(1, self.num_prefix + spec.num_patches, decoder_dim)
        dec_pos[0, self.num_prefix:] = sincos_pos_embed_2d(decoder_dim, self.grid)
        self.register_buffer("decoder_pos_embed", dec_pos, persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * spec.in_chans)

        if mae_init:
            self._initialize_weights()

    def _initialize_weights(self) -> None:
        """MAE's initialisation: xavier linears, N(0, .02) tokens, fixed sin-cos encoder positions."""
        self.apply(_init_mae_weights)
        enc = self.encoder
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, as MAE does
        for name in ("cls_token", "reg_token"):
            tok = getattr(enc, name, None)
            if tok is not None:
                nn.init.normal_(tok, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        pos = getattr(enc, "pos_embed", None)
        if pos is not None and self.spec.embed_dim % 4 == 0:
            # MAE keeps the encoder's position embedding fixed sin-cos (requires_grad=False); the
            # prefix slots, when timm gives them one, stay zero like MAE's cls slot.
            with torch.no_grad():
                pos.zero_()
                pos[0, pos.shape[1] - self.spec.num_patches:] = sincos_pos_embed_2d(
                    self.spec.embed_dim, self.grid)
            pos.requires_grad_(False)

    def _split_pos_embed(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """timm's ``pos_embed`` as (prefix part ``[1, P, D]`` or None, patch part ``[1, L, D]`` or None)."""
        pos = getattr(self.encoder, "pos_embed", None)
        if pos is None:
            return None, None
        if getattr(self.encoder, "no_embed_class", False) or pos.shape[1] == self.spec.num_patches:
            return None, pos
        return pos[:, : self.num_prefix], pos[:, self.num_prefix:]

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode only the visible patches: ``[N, C, H, W]`` -> (latent ``[N, P + L_keep, D]``, mask, ids_restore)."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # [N, L, D]
        pos_prefix, pos_patch = self._split_pos_embed()
        if pos_patch is not None:
            x = x + pos_patch  # positions are attached before the shuffle, as in MAE
        x, mask, ids_restore = random_masking(x, mask_ratio, generator=generator)  # [N, L_keep, D]

        # Prefix tokens in timm's order (cls, then registers), each with its own position if any.
        prefix = [t for t in (getattr(enc, "cls_token", None), getattr(enc, "reg_token", None))
                  if t is not None]
        if prefix:
            p = torch.cat(prefix, dim=1)  # [1, P, D]
            if pos_prefix is not None:
                p = p + pos_prefix
            x = torch.cat([p.expand(x.shape[0], -1, -1), x], dim=1)  # [N, P + L_keep, D]
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Reconstruct every patch: latent ``[N, P + L_keep, D]`` -> pixels ``[N, L, p*p*C]``."""
        x = self.decoder_embed(latent)  # [N, P + L_keep, Dd]
        n, _, dd = x.shape
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        n_masked = ids_restore.shape[1] - visible.shape[1]
        seq = torch.cat([visible, self.mask_token.expand(n, n_masked, -1)], dim=1)  # [N, L, Dd]
        seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle
        x = torch.cat([prefix, seq], dim=1) + self.decoder_pos_embed  # [N, P + L, Dd]
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix:])  # [N, L, p*p*C]

    def forward(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """``imgs [N, C, H, W]`` (normalised) -> ``{"loss", "pred" [N, L, p*p*C], "mask" [N, L]}``."""
        latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        target = patchify(imgs, self.patch)  # [N, L, p*p*C]
        # At mask_ratio 0 nothing is masked and the encoder sees every patch (the unmasked baseline
        # of benchmarks.training_bench); the loss is then taken over all patches, a plain autoencoder's.
        loss_mask = mask if self.mask_ratio > 0 else torch.ones_like(mask)
        loss = mae_loss(pred, target, loss_mask, self.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}


def decoder_param_count(model: MaskedAutoencoder) -> int:
    """Number of trainable parameters outside the encoder (for logging)."""
    enc = {id(p) for p in model.encoder.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in enc and p.requires_grad)


__all__ = [
    "MaskedAutoencoder", "decoder_param_count", "mae_loss", "patchify", "random_masking",
    "sincos_pos_embed_2d", "unpatchify",
]
