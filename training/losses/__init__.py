"""Self-supervised losses as pure functions, one small file per paper (as DINOv2's ``dinov2/loss``)."""

from training.losses.dino import dino_loss, teacher_entropy, update_center
from training.losses.info_nce import info_nce
from training.losses.moco import moco_loss, moco_v3_loss

__all__ = ["dino_loss", "info_nce", "moco_loss", "moco_v3_loss", "teacher_entropy", "update_center"]
