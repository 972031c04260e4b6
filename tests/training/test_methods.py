"""DINO, DINOv2, SimCLR and MoCo modules, the MoCo queue, any-size CLS features, and tiny training runs of
each method whose run directories load and export."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from training.backbone import DEFAULT_MODEL_NAME, cls_features, create_encoder, encoder_tokens
from training.config import TrainConfig
from training.contrastive import MoCo, MoCoQueue, SimCLR
from training.dino import DINO, DINOHead
from training.dinov2 import DINOv2
from training.run_dir import load_encoder
from training.train import train

TINY = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny_encoder():
    torch.manual_seed(0)
    return create_encoder(overrides=dict(TINY))


def test_cls_features_any_size_matches_timm_dynamic_img_size():
    encoder, _ = tiny_encoder()
    dynamic = timm.create_model(DEFAULT_MODEL_NAME, num_classes=0, dynamic_img_size=True, **TINY)
    dynamic.load_state_dict(encoder.state_dict())
    encoder.eval(), dynamic.eval()
    with torch.no_grad():
        for size in (28, 16, 12):
            x = torch.randn(3, 1, size, size)
            assert torch.allclose(cls_features(encoder, x), dynamic(x), atol=1e-6)
        x = torch.randn(2, 1, 28, 28)
        assert torch.equal(cls_features(encoder, x), encoder.forward_head(encoder.forward_features(x), pre_logits=True))
    assert not getattr(encoder, "dynamic_img_size", False)  # the saved encoder stays fixed-size


def test_dino_head_last_layer_is_weight_normalised():
    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)
    x = torch.randn(5, 8)
    before = head(x)
    with torch.no_grad():
        head.last_weight.mul_(torch.rand(16, 1) + 0.5)  # rescaling prototype rows changes nothing
    assert torch.allclose(head(x), before, atol=1e-6)
    assert before.abs().max() <= 1.0 + 1e-6  # cosine similarities to the prototypes


def test_dino_student_all_crops_teacher_globals_ema_and_centre():
    encoder, spec = tiny_encoder()
    model = DINO(encoder, spec, out_dim=16, hidden_dim=8, bottleneck_dim=4, n_local_crops=2)
    crops = [torch.randn(3, 1, 28, 28) for _ in range(2)] + [torch.randn(3, 1, 16, 16) for _ in range(2)]
    out = model(*crops, teacher_temp=0.04)
    assert out["teacher_out"].shape == (2, 3, 16) and math.isfinite(out["loss"].item())
    assert 0.0 <= out["teacher_entropy"].item() <= math.log(16) + 1e-5
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher_encoder.parameters())
    assert model.encoder.cls_token.grad is not None and model.head.last_weight.grad is not None
    with pytest.raises(ValueError, match="2 global \\+ 2 local"):
        model(*crops[:3])

    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    t_before = model.teacher_encoder.cls_token.clone()
    expected_center = 0.9 * model.center + 0.1 * out["teacher_out"].mean(dim=(0, 1))
    model.after_step(out, momentum=0.75)
    assert torch.allclose(model.teacher_encoder.cls_token, 0.75 * t_before + 0.25 * model.encoder.cls_token)
    assert torch.allclose(model.center, expected_center)


def test_mask_token_replaces_masked_patch_embeddings_only():
    encoder, _ = tiny_encoder()
    token = torch.randn(32)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[0, [0, 8, 9]] = True  # patches (0,0), (1,1), (1,2) of image 0
    x = torch.randn(2, 1, 28, 28)
    y = x.clone()
    y[0, :, 0:4, 0:4] += 5.0  # change only the pixels of masked patch (0, 0) of image 0
    y[0, :, 4:8, 4:12] -= 3.0  # and of (1, 1), (1, 2)
    with torch.no_grad():
        assert torch.equal(encoder_tokens(encoder, x), encoder.forward_features(x))  # no mask: timm's forward
        assert torch.equal(encoder_tokens(encoder, x, mask, token), encoder_tokens(encoder, y, mask, token))
        assert not torch.equal(encoder_tokens(encoder, x, mask, token)[1], encoder_tokens(encoder, x)[0])
        assert torch.allclose(encoder_tokens(encoder, x, mask, token)[1], encoder_tokens(encoder, x)[1])
        y[0, :, 0:4, 4:8] += 1.0  # an unmasked patch: the output changes
        assert not torch.equal(encoder_tokens(encoder, x, mask, token), encoder_tokens(encoder, y, mask, token))


@pytest.mark.parametrize("centering,separate", [("sinkhorn_knopp", False), ("centre", True)])
def test_dinov2_loss_parts_gradients_and_teacher(centering, separate):
    encoder, spec = tiny_encoder()
    model = DINOv2(encoder, spec, out_dim=16, hidden_dim=8, bottleneck_dim=4, n_local_crops=2,
                   centering=centering, ibot_separate_head=separate)
    crops = [torch.randn(4, 1, 28, 28) for _ in range(2)] + [torch.randn(4, 1, 16, 16) for _ in range(2)]
    masks = [torch.zeros(4, 49, dtype=torch.bool) for _ in range(2)]
    masks[0][1, 3:10] = True
    masks[1][2, 20:24] = True
    out = model(*crops, *masks, teacher_temp=0.04)
    assert out["loss"].item() == pytest.approx(
        (out["dino_loss"] + out["ibot_loss"] + 0.1 * out["koleo_loss"]).item(), rel=1e-6)
    assert out["teacher_patch_out"].shape == (11, 16) and out["teacher_out"].shape == (2, 4, 16)
    assert 0.0 < out["ibot_teacher_entropy"].item() <= math.log(16) + 1e-5
    out["loss"].backward()
    assert model.patch_mask_token.grad is not None and model.patch_mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher_encoder.parameters())
    patch_head = model.ibot_head if separate else model.head
    assert patch_head.last_weight.grad.abs().sum() > 0
    assert len(model.last_layer_params()) == (2 if separate else 1)
    assert "patch_mask_token" not in {k.split(".")[0] for k in model.export_encoder.state_dict()}
    assert set(model.export_encoder.state_dict()) == set(encoder.state_dict())  # a plain timm ViT
    center = model.center.clone()
    model.after_step(out, momentum=0.5)
    assert torch.equal(model.center, center) == (centering == "sinkhorn_knopp")  # SK keeps no running centre
    assert torch.equal(model.patch_center.abs().sum() > 0, torch.tensor(centering == "centre"))
    with pytest.raises(ValueError, match="2 masks"):
        model(*crops)


def test_moco_queue_pointer_wraps_and_is_decoupled_from_batch():
    q = MoCoQueue(5, 2)
    a = torch.arange(6.0).view(3, 2)
    q.enqueue(a)
    assert int(q.ptr) == 3 and torch.equal(q.keys[:3], a)
    b = 10 + torch.arange(6.0).view(3, 2)
    q.enqueue(b)  # rows 3, 4 then wraps to 0
    assert int(q.ptr) == 1
    assert torch.equal(q.keys[3:5], b[:2]) and torch.equal(q.keys[0], b[2]) and torch.equal(q.keys[1:3], a[1:])
    q.enqueue(100 + torch.arange(14.0).view(7, 2))  # larger than the queue: keeps the newest 5
    assert int(q.ptr) == (1 + 5) % 5 and set(q.keys[:, 0].tolist()) == {104.0, 106.0, 108.0, 110.0, 112.0}
    assert {"keys", "ptr"} <= set(q.state_dict())


@pytest.mark.parametrize("v3", [False, True])
def test_moco_forward_and_momentum_update(v3):
    encoder, spec = tiny_encoder()
    model = MoCo(encoder, spec, queue_size=10, proj_dim=8, hidden_dim=16, temperature=0.2, v3=v3)
    x1, x2 = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    out = model(x1, x2)
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and out["feature_std"].item() > 0
    assert all(p.grad is None for p in model.key_encoder.parameters())
    assert (model.predictor is not None) == v3 and (model.queue is None) == v3
    model.after_step(out, momentum=0.5)
    if not v3:
        assert int(model.queue.ptr) == 4
        assert torch.allclose(model.queue.keys[:4], out["keys"])


def test_simclr_forward_gradients_reach_encoder():
    encoder, spec = tiny_encoder()
    model = SimCLR(encoder, spec, proj_dim=8, hidden_dim=16, temperature=0.5)
    x = torch.randn(4, 1, 28, 28)
    out = model(x, x + 0.01 * torch.randn_like(x))
    out["loss"].backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    assert out["loss"].item() < math.log(7)  # near-identical views beat chance (2N-1 = 7 classes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_folder):
    """One tiny run per method: 64 images, batch 16, 2 epochs, a 1-block 32-d ViT."""
    out = {}
    for method in ("dino", "dinov2", "simclr", "moco"):
        cfg = TrainConfig.for_method(
            method, data=str(image_folder), overrides=dict(TINY), batch_size=16, epochs=2, log_every=1,
            num_threads=1, dino_out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8, proj_dim=8,
            queue_size=24, n_local_crops=2, out_dir=str(tmp_path_factory.mktemp(method) / "run"))
        out[method] = train(cfg)
    return out


@pytest.mark.parametrize("method,signal,model_keys", [
    ("dino", "teacher_entropy", ("teacher_encoder.", "teacher_head.", "center", "head.")),
    ("dinov2", "ibot_teacher_entropy", ("teacher_encoder.", "teacher_head.", "patch_mask_token", "patch_center")),
    ("simclr", "feature_std", ("projector.",)),
    ("moco", "feature_std", ("key_encoder.", "key_projector.", "queue.keys", "queue.ptr")),
])
def test_method_runs_write_run_dirs(runs, method, signal, model_keys):
    run = runs[method]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) and signal in r for r in records)
    if method != "simclr":  # the EMA momentum follows the cosine up to 1
        assert records[0]["momentum"] < records[-1]["momentum"] <= 1.0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["method"] == method
    assert all(any(k.startswith(p) for k in ckpt["model"]) for p in model_keys)
    encoder_state = torch.load(run / "encoder.pt", weights_only=True)
    assert not any(k.startswith(("teacher", "head", "projector", "key_", "queue", "patch_mask")) for k in encoder_state)
    model, spec = load_encoder(run)
    prefix = "teacher_encoder." if method.startswith("dino") else "encoder."  # DINO stores its teacher
    stored = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    assert stored and all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    assert spec.img_size == (28, 28) and not getattr(model, "dynamic_img_size", False)


def test_method_run_dirs_export_to_onnx(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    from export.repository import export_run

    for method, run in runs.items():
        (model_dir,) = export_run(run, tmp_path / "repo", name=f"tiny_{method}")
        manifest = json.loads((model_dir / "manifest.json").read_text())
        assert manifest["encoder_spec"]["img_size"] == [28, 28]
        errors = manifest["parity"]["max_abs_err"]
        assert set(errors) == {"cls", "patch_tokens"}
        assert max(errors.values()) <= manifest["parity"]["tolerance"]
