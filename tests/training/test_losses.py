"""Self-supervised losses against small hand-computed references (lightly-style tests/loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    dino_loss, ibot_patch_loss, info_nce, koleo_loss, moco_loss, moco_v3_loss, nearest_neighbour_distances,
    sinkhorn_knopp, teacher_entropy, update_center, update_patch_center,
)


def _unit_pair(cos: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 2-D unit vectors with the given cosine similarity."""
    return torch.tensor([1.0, 0.0]), torch.tensor([cos, math.sqrt(1 - cos * cos)])


def _views_with(pos: float, neg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2 images -> 4 views in 3-D: each positive pair has cosine ``pos``, every other pair ``neg``."""
    # Gram matrix [[1, pos, neg, neg], ...] in the order (a1, b1, a2, b2); its Cholesky factor gives vectors.
    g = torch.full((4, 4), neg, dtype=torch.float64)
    g.fill_diagonal_(1.0)
    g[0, 1] = g[1, 0] = g[2, 3] = g[3, 2] = pos
    v = torch.linalg.cholesky(g).float()  # rows are the views
    # info_nce(z1, z2): row i of z1 and z2 are the two views of image i
    return v[[0, 2]], v[[1, 3]]


def test_info_nce_lecture_worked_example():
    # 2 images -> 4 views; positive similarity 0.9, negatives 0.1, T = 0.1. Per view:
    # loss = -log(e^9 / (e^9 + e^1 + e^1)) = log(1 + 2 e^-8) ~= 6.7e-4 (same for all 4 views).
    z1, z2 = _views_with(0.9, 0.1)
    expected = math.log(1 + 2 * math.exp(-8))
    assert info_nce(z1, z2, 0.1).item() == pytest.approx(expected, rel=1e-4)
    assert expected < 1e-3  # tiny: the positive dominates
    # Similarity 0.2 to the positive instead: -log(e^2 / (e^2 + 2 e^1)) = log(1 + 2 e^-1) ~= 0.551
    z1, z2 = _views_with(0.2, 0.1)
    assert info_nce(z1, z2, 0.1).item() == pytest.approx(math.log(1 + 2 * math.exp(-1)), rel=1e-4)


def test_info_nce_matches_loop_reference_and_is_scale_invariant():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(10):  # eq. 1 of SimCLR, written out
        partner = (i + 5) % 10
        denom = sum(math.exp(float(z[i] @ z[k]) / 0.5) for k in range(10) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[partner]) / 0.5) / denom)
    assert info_nce(z1, z2, 0.5).item() == pytest.approx(total / 10, rel=1e-5)
    assert info_nce(3 * z1, z2, 0.5).item() == pytest.approx(total / 10, rel=1e-5)
    with pytest.raises(ValueError):
        info_nce(z1, z2[:4], 0.5)


def test_dino_loss_hand_computed_two_crops():
    # One image, K = 2, two global crops only, student_temp 1, teacher_temp 1, centre 0:
    # pairs are (teacher 0, student 1) and (teacher 1, student 0).
    s = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # student probs: [.5, .5], [.75, .25]
    t = torch.tensor([[[math.log(4.0), 0.0]], [[0.0, 0.0]]])  # teacher probs: [.8, .2], [.5, .5]
    ce_01 = -(0.8 * math.log(0.75) + 0.2 * math.log(0.25))
    ce_10 = -(0.5 * math.log(0.5) + 0.5 * math.log(0.5))
    got = dino_loss(s, t, torch.zeros(2), student_temp=1.0, teacher_temp=1.0)
    assert got.item() == pytest.approx((ce_01 + ce_10) / 2, rel=1e-6)
    # Centre c = [log 4, 0]: teacher 0 becomes uniform, teacher 1 softmax([-log 4, 0]) = [.2, .8].
    got_c = dino_loss(s, t, torch.tensor([math.log(4.0), 0.0]), 1.0, 1.0)
    first = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))  # uniform teacher 0 vs student 1
    second = -(0.2 * math.log(0.5) + 0.8 * math.log(0.5))  # [.2, .8] vs uniform student 0
    assert got_c.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_dino_loss_pairs_local_crops_sharpens_and_stops_gradient():
    torch.manual_seed(0)
    v, g, n, k = 4, 2, 3, 5
    s = torch.randn(v, n, k, requires_grad=True)
    t = torch.randn(g, n, k, requires_grad=True)
    c = torch.randn(k)
    ref, pairs = 0.0, 0
    for iq in range(g):
        q = F.softmax((t[iq] - c) / 0.04, dim=-1)
        for iv in range(v):
            if iv != iq:
                ref = ref + (-q * F.log_softmax(s[iv] / 0.1, dim=-1)).sum(-1).mean()
                pairs += 1
    assert pairs == 6  # 2 teachers x 4 students minus the 2 same-view pairs
    loss = dino_loss(s, t, c, 0.1, 0.04)
    assert loss.item() == pytest.approx((ref / pairs).item(), rel=1e-5)
    loss.backward()
    assert t.grad is None and s.grad is not None  # stop-gradient on the teacher
    # Sharpening: a lower teacher temperature gives a lower-entropy teacher.
    assert teacher_entropy(t, c, 0.04) < teacher_entropy(t, c, 1.0) <= math.log(k) + 1e-6


def test_update_center_is_ema_of_batch_mean():
    c = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[[0.0, 4.0], [2.0, 0.0]], [[4.0, 0.0], [2.0, 4.0]]])  # mean over crops+images [2, 2]
    assert torch.allclose(update_center(c, t, 0.9), torch.tensor([[0.9 * 1 + 0.1 * 2, 0.9 * 2 + 0.1 * 2]]))
    assert torch.equal(update_center(c, t, 1.0), c)


def test_moco_loss_hand_computed():
    # One query, its key at cosine 0.9, two queued negatives at 0.0 and 0.5, T = 0.2:
    # loss = -log(e^{4.5} / (e^{4.5} + e^0 + e^{2.5})).
    q, k = _unit_pair(0.9)
    _, n1 = _unit_pair(0.0)
    _, n2 = _unit_pair(0.5)
    got = moco_loss(q[None], k[None], torch.stack([n1, n2]), 0.2)
    expected = -math.log(math.exp(4.5) / (math.exp(4.5) + 1 + math.exp(2.5)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    kk = k[None].clone().requires_grad_(True)
    moco_loss(q[None].requires_grad_(True), kk, torch.stack([n1, n2]), 0.2).backward()
    assert kk.grad is None  # keys are stop-gradient


def test_moco_v3_loss_symmetric_in_batch():
    torch.manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(4, 6) for _ in range(4))

    def ctr(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return F.cross_entropy(q @ k.T / 0.2, torch.arange(4)) * 2 * 0.2

    assert moco_v3_loss(q1, q2, k1, k2, 0.2).item() == pytest.approx((ctr(q1, k2) + ctr(q2, k1)).item(), rel=1e-6)


# ------------------------------------------------------------------------------ DINOv2 losses

def test_koleo_hand_made_set_with_known_nearest_neighbours():
    # Unit vectors at 0, 60 and 180 degrees: chords 2 sin(d/2) are 1 (0-60), sqrt(3) (60-180), 2 (0-180),
    # so the nearest-neighbour distances are 1, 1, sqrt(3) and L = -(log 1 + log 1 + log sqrt 3) / 3.
    angles = torch.tensor([0.0, math.pi / 3, math.pi])
    x = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    assert torch.allclose(nearest_neighbour_distances(x), torch.tensor([1.0, 1.0, math.sqrt(3)]), atol=1e-6)
    assert koleo_loss(x).item() == pytest.approx(-math.log(3) / 6, abs=1e-6)
    scaled = x * torch.tensor([[2.0], [0.5], [7.0]])  # KoLeo normalises the features first
    assert koleo_loss(scaled).item() == pytest.approx(-math.log(3) / 6, abs=1e-6)
    x = x.clone().requires_grad_(True)
    koleo_loss(x).backward()
    # The gradient pushes the close pair (0 and 60 degrees) apart along the circle: descending it
    # turns the first point clockwise (negative y) and the second anticlockwise.
    assert x.grad[0, 1] > 0 and x.grad[1, 0] > 0
    with pytest.raises(ValueError, match="at least two"):
        koleo_loss(torch.randn(1, 4))


def _sinkhorn_reference(scores: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """SwAV's Algorithm 1 (``distributed_sinkhorn``), written out in float64 loops over the matrix."""
    q = torch.exp(scores.double() / eps).T.clone()  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for i in range(k):
            q[i] /= q[i].sum() * k
        for j in range(b):
            q[:, j] /= q[:, j].sum() * b
    return (q * b).T


def test_sinkhorn_knopp_matches_swav_reference_and_equipartitions():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    got = sinkhorn_knopp(logits, 0.1, 3)
    torch.testing.assert_close(got.double(), _sinkhorn_reference(logits, 0.1, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(6))  # every sample a distribution
    assert not torch.allclose(got.sum(0), torch.full((4,), 6 / 4), atol=1e-3)  # 3 iterations: near, not at
    converged = sinkhorn_knopp(logits, 0.1, 200)
    torch.testing.assert_close(converged.sum(1), torch.ones(6))
    torch.testing.assert_close(converged.sum(0), torch.full((4,), 6 / 4), atol=1e-5, rtol=0)  # B / K each
    # Logits offset by 100 (exp(1000) overflows even float64): shifted by their maximum, the same answer.
    torch.testing.assert_close(sinkhorn_knopp(logits + 100, 0.1, 3), got, rtol=1e-3, atol=1e-5)  # float32 of x+100
    big = torch.randn(8, 16, requires_grad=True)
    assert not sinkhorn_knopp(big, 0.05).requires_grad  # targets are stop-gradient


def test_ibot_patch_loss_reads_masked_positions_only():
    torch.manual_seed(0)
    b, length, k = 3, 5, 4
    student = torch.randn(b, length, k, requires_grad=True)
    teacher = F.softmax(torch.randn(b, length, k), dim=-1)
    masks = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    ref = 0.0
    for i in range(b):  # iBOT eq. 2 with DINOv2's weights: per image 1/|M_b|, then / B (all images)
        rows = [j for j in range(length) if masks[i, j]]
        for j in rows:
            ref += -(teacher[i, j] * F.log_softmax(student[i, j] / 0.1, dim=-1)).sum() / len(rows)
    loss = ibot_patch_loss(student, teacher, masks, 0.1)
    assert loss.item() == pytest.approx(ref.item() / b, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(student.grad[~masks]) == 0  # zero gradient from unmasked positions
    assert torch.all(student.grad[masks].abs().sum(-1) > 0)
    # Garbage (NaN teacher, huge student) at unmasked positions changes nothing.
    noisy_t, noisy_s = teacher.clone(), student.detach().clone()
    noisy_t[~masks], noisy_s[~masks] = float("nan"), 1e6
    assert ibot_patch_loss(noisy_s, noisy_t, masks, 0.1).item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="bool"):
        ibot_patch_loss(student, teacher, masks.long(), 0.1)


def test_update_patch_center_is_ema_of_masked_row_mean():
    c = torch.zeros(1, 2)
    rows = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    assert torch.allclose(update_patch_center(c, rows, 0.9), torch.tensor([[0.2, 0.4]]))
    assert torch.equal(update_patch_center(c, rows[:0], 0.9), c)  # nothing masked: unchanged
