"""Self-supervised losses as pure functions, one small file per paper (as DINOv2's ``dinov2/loss``)."""

from training.losses.dino import dino_cross_entropy, dino_loss, mean_entropy, teacher_entropy, update_center
from training.losses.ibot_patch import ibot_patch_loss, update_patch_center
from training.losses.info_nce import info_nce
from training.losses.koleo import koleo_loss, nearest_neighbour_distances
from training.losses.moco import moco_loss, moco_v3_loss
from training.losses.sinkhorn_knopp import sinkhorn_knopp

__all__ = ["dino_cross_entropy", "dino_loss", "ibot_patch_loss", "info_nce", "koleo_loss", "mean_entropy",
           "moco_loss", "moco_v3_loss", "nearest_neighbour_distances", "sinkhorn_knopp", "teacher_entropy",
           "update_center", "update_patch_center"]
