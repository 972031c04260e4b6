"""MAE pieces against hand-written references (He et al. 2022, models_mae.py)."""

from __future__ import annotations

import pytest
import torch

from training.backbone import DEFAULT_OVERRIDES, create_encoder
from training.mae import (
    MaskedAutoencoder, mae_loss, patchify, random_masking, sincos_pos_embed_2d, unpatchify,
)


def tiny_mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder, spec = create_encoder(overrides={**DEFAULT_OVERRIDES, "depth": 2, **kw})
    return MaskedAutoencoder(encoder, spec, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def test_patchify_layout_and_round_trip():
    imgs = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    x = patchify(imgs, 2)
    assert x.shape == (2, 6, 2 * 2 * 3)
    # Patch (row 1, col 2) = pixels [2:4, 4:6], flattened in (p, p, C) order.
    expected = imgs[0, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1)
    assert torch.equal(x[0, 1 * 3 + 2], expected)
    assert torch.equal(unpatchify(x, 2, (2, 3), 3), imgs)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 5, 4), 2)


@pytest.mark.parametrize("length,ratio,keep", [(16, 0.75, 4), (49, 0.75, 12), (10, 0.5, 5)])
def test_random_masking_keeps_fixed_count_and_inverts(length, ratio, keep):
    n, d = 5, 3
    x = torch.randn(n, length, d)
    g = torch.Generator().manual_seed(1)
    visible, mask, ids_restore = random_masking(x, ratio, generator=g)
    assert visible.shape == (n, keep, d)
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))
    for i in range(n):
        assert torch.equal(ids_restore[i].sort().values, torch.arange(length))  # a permutation
        kept = (mask[i] == 0).nonzero().flatten()
        # the visible tokens are exactly the unmasked ones (as a set)
        assert {tuple(r.tolist()) for r in visible[i]} == {tuple(x[i, j].tolist()) for j in kept}
    # ids_restore inverts the shuffle: padding with the masked tokens and gathering restores x.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(shuffled[:, :keep], visible)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(restored, x)


def test_random_masking_is_per_sample_and_follows_noise():
    x = torch.arange(8, dtype=torch.float32).view(1, 8, 1).repeat(2, 1, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4],
                          [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]])
    visible, mask, _ = random_masking(x, 0.5, noise=noise)
    assert visible[0].flatten().tolist() == [1, 3, 5, 7]  # smallest noise first
    assert visible[1].flatten().tolist() == [0, 2, 4, 6]
    assert mask[0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert mask[1].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]


def _reference_loss(pred, target, mask, norm_pix):
    total, count = 0.0, 0
    for i in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            if mask[i, j] != 1:
                continue
            t = target[i, j].tolist()
            if norm_pix:
                m = sum(t) / len(t)
                var = sum((v - m) ** 2 for v in t) / (len(t) - 1)
                t = [(v - m) / (var + 1e-6) ** 0.5 for v in t]
            p = pred[i, j].tolist()
            total += sum((a - b) ** 2 for a, b in zip(p, t)) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_hand_reference(norm_pix):
    pred = torch.tensor([[[1.0, 0.0, 2.0], [0.5, 0.5, 0.5]],
                         [[0.0, 0.0, 0.0], [3.0, -1.0, 1.0]]])
    target = torch.tensor([[[1.0, 2.0, 3.0], [9.0, 9.0, 9.0]],
                           [[4.0, 0.0, 2.0], [1.0, 1.0, 4.0]]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    got = mae_loss(pred, target, mask, norm_pix_loss=norm_pix).item()
    assert got == pytest.approx(_reference_loss(pred, target, mask, norm_pix), rel=1e-5)
    if not norm_pix:  # by hand: patch (0,0): (0+4+1)/3; (1,0): (16+0+4)/3; (1,1): (4+4+9)/3
        assert got == pytest.approx((5 / 3 + 20 / 3 + 17 / 3) / 3)


def test_mae_loss_ignores_visible_patches():
    pred, target = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
    pred[0, 0] = 100.0  # error only on a visible patch
    assert mae_loss(pred, target, torch.tensor([[0.0, 1.0]]), norm_pix_loss=False).item() == 0.0


def test_sincos_pos_embed_shape_and_distinct_rows():
    emb = sincos_pos_embed_2d(16, (3, 4))
    assert emb.shape == (12, 16)
    assert torch.unique(emb, dim=0).shape[0] == 12
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(10, (2, 2))


def test_encoder_blocks_see_only_visible_tokens():
    model = tiny_mae()
    seen = []
    for blk in model.encoder.blocks:
        blk.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    out = model(torch.randn(3, 1, 28, 28))
    keep = int(49 * 0.25)
    assert seen == [torch.Size([3, 1 + keep, 192])] * 2  # cls + 12 visible, no mask tokens
    assert out["pred"].shape == (3, 49, 16)
    assert out["mask"].shape == (3, 49) and torch.all(out["mask"].sum(1) == 49 - keep)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_encoder_position_embedding_fixed_sincos_and_gradients_flow():
    model = tiny_mae()
    pos = model.encoder.pos_embed
    assert not pos.requires_grad
    assert torch.allclose(pos[0, 1:], sincos_pos_embed_2d(192, (7, 7)))
    model(torch.randn(2, 1, 28, 28))["loss"].backward()
    assert model.encoder.cls_token.grad is not None and model.mask_token.grad is not None
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_register_tokens_are_prefixed_and_dropped_from_prediction():
    model = tiny_mae(reg_tokens=2, no_embed_class=True)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    out = model(torch.randn(2, 1, 28, 28))
    assert seen == [torch.Size([2, 3 + 12, 192])]
    assert out["pred"].shape == (2, 49, 16)


def test_non_vit_encoder_is_rejected_clearly():
    _, spec = create_encoder(overrides={**DEFAULT_OVERRIDES, "depth": 1})
    with pytest.raises(ValueError, match="lacks"):
        MaskedAutoencoder(torch.nn.Linear(2, 2), spec)


def test_mask_ratio_zero_encodes_every_patch_and_reconstructs_all():
    mae = tiny_mae()
    mae.mask_ratio = 0.0
    imgs = torch.randn(2, 1, 28, 28)
    latent, mask, _ = mae.forward_encoder(imgs, 0.0)
    assert latent.shape[1] == mae.num_prefix + 49 and mask.sum() == 0
    out = mae(imgs)
    assert out["loss"].item() > 0  # loss over all patches, not an empty masked set
    out["loss"].backward()
    assert mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
