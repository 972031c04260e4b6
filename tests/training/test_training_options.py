"""DINO's weight-decay schedule and last-layer freezing, MoCo v3's frozen patch projection,
``init_from`` (run directory, .pt, checkpoint.pt, .safetensors), the online k-NN on a held-out
split, and bf16 autocast for every method."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from training.backbone import create_encoder
from training.config import ConfigError, TrainConfig
from training.data import LabelledImages
from training.methods import METHOD_REGISTRY, build_model, weight_decay_at
from training.online_knn import OnlineKNN, split_validation
from training.run_dir import save_encoder
from training.schedules import weight_decay_schedule
from training.train import main, param_groups, train, train_step

TINY = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}
SMALL_HEADS = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, dino_out_dim=32, head_hidden_dim=16,
                   head_bottleneck_dim=8, proj_dim=8, queue_size=24, n_local_crops=2)


def tiny(method: str, **kw) -> TrainConfig:
    return TrainConfig.for_method(method, overrides=dict(TINY), **{**SMALL_HEADS, **kw})


def views_for(method: str, cfg: TrainConfig, spec, n: int = 8) -> list[torch.Tensor]:
    x01 = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return METHOD_REGISTRY[method].views(cfg, x01, spec, torch.Generator().manual_seed(2))


# ------------------------------------------------------------------------------ DINO schedules

def test_weight_decay_schedule_is_dinos_cosine():
    assert weight_decay_schedule(0, 100) == pytest.approx(0.04)
    assert weight_decay_schedule(50, 100) == pytest.approx(0.22)  # (0.04 + 0.4) / 2 at the midpoint
    assert weight_decay_schedule(100, 100) == pytest.approx(0.4)
    assert weight_decay_schedule(25, 100) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert weight_decay_at(TrainConfig.for_method("mae"), 50, 100) == 0.05  # constant without an end
    dino = TrainConfig.for_method("dino")
    assert (dino.weight_decay, dino.weight_decay_end, dino.freeze_last_layer) == (0.04, 0.4, 1.0)
    assert weight_decay_at(dino, 100, 100) == pytest.approx(0.4)


def test_freezing_drops_only_the_last_layer_gradient():
    torch.manual_seed(0)
    model, spec = build_model(tiny("dino"))
    opt = torch.optim.AdamW(param_groups(model, 0.04), lr=1e-2)
    views = views_for("dino", tiny("dino"), spec)
    last, hidden = model.head.last_weight.detach().clone(), model.head.mlp[0].weight.detach().clone()
    train_step(model, opt, views, 1e-2, False, {"momentum": 0.9}, clip_grad=3.0, frozen=model.last_layer_params())
    assert torch.equal(model.head.last_weight, last)
    assert not torch.equal(model.head.mlp[0].weight, hidden)
    train_step(model, opt, views, 1e-2, False, {"momentum": 0.9}, clip_grad=3.0)
    assert not torch.equal(model.head.last_weight, last)


def test_dino_run_freezes_first_epoch_and_raises_weight_decay(tmp_path, image_folder):
    # 64 images, batch 16: 4 steps per epoch; frozen for epoch 1 (steps 1-4), then trained.
    cfg = tiny("dino", data=str(image_folder), batch_size=16, epochs=2, log_every=1, num_threads=1,
               out_dir=str(tmp_path / "run"), stop_at_step=4)
    run = train(cfg)
    torch.manual_seed(cfg.seed)
    fresh, _ = build_model(cfg)  # the loop builds the model right after seeding, as here
    state = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert torch.equal(state["head.last_weight"], fresh.head.last_weight)
    assert not torch.equal(state["head.mlp.0.weight"], fresh.head.mlp[0].weight)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    wd = [r["weight_decay"] for r in records]
    assert wd[0] == pytest.approx(0.04) and wd == sorted(wd) and wd[-1] < 0.4


# ------------------------------------------------------------------------- MoCo v3 patch embed

def test_moco_v3_frozen_patch_projection():
    cfg = tiny("moco", moco_v3=True, moco_v3_freeze_patch_embed=True)
    torch.manual_seed(0)
    model, spec = build_model(cfg)
    frozen = {k: v.detach().clone() for k, v in model.encoder.patch_embed.named_parameters()}
    assert frozen and not any(p.requires_grad for p in model.encoder.patch_embed.parameters())
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    cls_before = model.encoder.cls_token.detach().clone()
    train_step(model, opt, views_for("moco", cfg, spec), 1e-2, False, {"momentum": 0.9})
    assert all(torch.equal(p, frozen[k]) for k, p in model.encoder.patch_embed.named_parameters())
    # the key encoder's EMA of two equal values: equal up to float rounding of m*x + (1-m)*x
    assert all(torch.allclose(p, frozen[k], rtol=0, atol=1e-6) for k, p in model.key_encoder.patch_embed.named_parameters())
    assert not torch.equal(model.encoder.cls_token, cls_before)
    with pytest.raises(ConfigError, match="moco_v3=true"):
        tiny("moco", moco_v3_freeze_patch_embed=True)


# ---------------------------------------------------------------------------------- init_from

@pytest.fixture(scope="module")
def source_encoder():
    torch.manual_seed(123)
    return create_encoder(overrides=dict(TINY))


@pytest.mark.parametrize("form", ["run_dir", "pt", "checkpoint", "safetensors"])
def test_init_from_sets_the_encoder_and_its_ema_copy(tmp_path, source_encoder, form):
    encoder, spec = source_encoder
    state = encoder.state_dict()
    if form == "run_dir":
        save_encoder(tmp_path, encoder, spec)
        source = tmp_path
    elif form == "pt":
        source = tmp_path / "enc.pt"
        torch.save({**state, "head.weight": torch.zeros(3, 32)}, source)  # a timm classifier is ignored
    elif form == "checkpoint":
        source = tmp_path / "checkpoint.pt"
        torch.save({"model": {**{f"encoder.{k}": v for k, v in state.items()}, "head.x": torch.zeros(1)}}, source)
    else:
        from safetensors.torch import save_file

        source = tmp_path / "enc.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    torch.manual_seed(0)
    model, _ = build_model(tiny("dino", init_from=str(source)))
    for k, v in state.items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
        assert torch.equal(model.teacher_encoder.state_dict()[k], v), k  # the teacher starts from it too
    torch.manual_seed(0)
    scratch, _ = build_model(tiny("dino"))
    assert torch.equal(model.head.last_weight, scratch.head.last_weight)  # heads are not touched


def test_init_from_errors_name_the_problem(tmp_path, source_encoder):
    encoder, _ = source_encoder
    wide = tmp_path / "wide.pt"
    torch.save(create_encoder(overrides={**TINY, "embed_dim": 48})[0].state_dict(), wide)
    with pytest.raises(ConfigError, match=r"shape mismatches \(cls_token: file \(1, 1, 48\) vs encoder \(1, 1, 32\)"):
        build_model(tiny("mae", init_from=str(wide)))
    deep = tmp_path / "deep.pt"
    torch.save(create_encoder(overrides={**TINY, "depth": 2})[0].state_dict(), deep)
    with pytest.raises(ConfigError, match=r"unexpected keys \['blocks\.1\."):
        build_model(tiny("mae", init_from=str(deep)))
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in encoder.state_dict().items() if k != "pos_embed"}, partial)
    with pytest.raises(ConfigError, match=r"missing keys \['pos_embed'\]"):
        build_model(tiny("mae", init_from=str(partial)))
    with pytest.raises(ConfigError, match="no such run directory or weights file"):
        build_model(tiny("mae", init_from=str(tmp_path / "nothing.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        build_model(tiny("mae", init_from=str(tmp_path / "junk.pt")))
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_model(tiny("mae", init_from="timm:not_a_model_name"))


def test_cli_init_from_bad_file_exits_2(tmp_path, image_folder, capsys):
    args = ["--method", "mae", "--data", str(image_folder), "--out", str(tmp_path / "run"), "--batch-size", "16",
            "model.embed_dim=32", "model.depth=1", "model.num_heads=2", f"init_from={tmp_path / 'missing.pt'}"]
    assert main(args) == 2
    assert "init_from=" in capsys.readouterr().err


# -------------------------------------------------------------------------------- online k-NN

def test_split_validation_is_disjoint_and_seeded():
    data = LabelledImages(np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1), np.arange(20) % 2, ("a", "b"))
    train_part, val = split_validation(data, 5, seed=3)
    assert len(train_part) == 15 and len(val) == 5
    assert set(train_part.images.ravel()) | set(val.images.ravel()) == set(range(20))
    assert not set(train_part.images.ravel()) & set(val.images.ravel())
    assert np.array_equal(split_validation(data, 5, seed=3)[1].images, val.images)
    assert split_validation(data, 0, seed=3)[0] is data
    with pytest.raises(ConfigError, match="hold out all"):
        split_validation(data, 20, seed=0)
    unlabelled = LabelledImages(data.images, np.full(20, -1), ())
    with pytest.raises(ConfigError, match="needs labels"):
        OnlineKNN.from_split(*split_validation(unlabelled, 5, 0), bank_size=10, seed=0)


def test_online_knn_on_held_out_split_is_logged(tmp_path, image_folder):
    # 64 labelled images: 16 held out, 48 pre-train (3 steps/epoch at batch 16); k-NN every 2 steps and at the end.
    cfg = tiny("simclr", data=str(image_folder), batch_size=16, epochs=2, log_every=1, num_threads=1,
               knn_val=16, knn_every_steps=2, knn_k=5, out_dir=str(tmp_path / "run"))
    run = train(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # 48 images: 3 steps per epoch
    scored = {r["step"]: r["knn_val_top1"] for r in records if "knn_val_top1" in r}
    assert sorted(scored) == [2, 4, 6] and all(0.0 <= a <= 1.0 for a in scored.values())
    # monitoring draws no random numbers: the same split unmonitored trains identically
    quiet = train(dataclasses.replace(cfg, knn_every_steps=0, out_dir=str(tmp_path / "quiet")))
    quiet_losses = [json.loads(line)["loss"] for line in (quiet / "metrics.jsonl").read_text().splitlines()]
    assert quiet_losses == [r["loss"] for r in records]
    with pytest.raises(ConfigError, match="set knn_val"):
        TrainConfig(knn_every=1.0)


# ------------------------------------------------------------------------------------- bf16

@pytest.mark.parametrize("method,extra", [("mae", {}), ("dino", {}), ("dinov2", {}), ("simclr", {}), ("moco", {}),
                                          ("moco", {"moco_v3": True})])
def test_bf16_step_is_finite_and_close_to_fp32(method, extra):
    cfg = tiny(method, **extra)
    torch.manual_seed(0)
    model, spec = build_model(cfg)
    views = views_for(method, cfg, spec)
    sched = {k: v for k, v in {"momentum": 0.99, "teacher_temp": 0.04}.items() if k in METHOD_REGISTRY[method].schedules}
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(5)  # MAE draws its mask from the global generator: the same mask both times
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(*views, **sched)
        assert out["loss"].dtype == torch.float32  # losses upcast out of bf16
        out["loss"].backward()
        losses[bf16] = out["loss"].item()
    assert math.isfinite(losses[True])
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    loss, _ = train_step(model, opt, views, 1e-3, True, sched)
    assert math.isfinite(loss)
