"""Loss maths against independent references on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from trainer.losses import (
    CLSFeatureLoss,
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    PatchFeatureLoss,
    SoftmaxCentering,
    Targets,
    cosine_distance,
    masked_positions,
    prototype_cross_entropy,
    sinkhorn_knopp,
)
from trainer.models import heads
from trainer.models.heads import DINOHead, normalized_rows


def soft_ce(target: torch.Tensor, logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean soft-target cross-entropy by torch's own F.cross_entropy."""
    return F.cross_entropy(logits / temp, target)


@pytest.mark.parametrize("local_crops", [0, 1, 8])
def test_dino_loss_pairs_crops_like_the_original(local_crops: int) -> None:
    """The fused DINO loss against torch's own soft-target cross-entropy on the logits ``f W^T``,
    pair by pair as the original scores them; gradients against autograd's through the same."""
    torch.manual_seed(local_crops)
    batch, prototypes, width = 5, 32, 6
    features = torch.randn((2 + local_crops) * batch, width, requires_grad=True)
    weight = torch.randn(prototypes, width, requires_grad=True)
    teacher = torch.randn(2, batch, prototypes).softmax(-1)
    logits = (features @ weight.T).view(2 + local_crops, batch, prototypes)
    pairs = [(teacher[1], logits[0]), (teacher[0], logits[1])]
    pairs += [(teacher[g], logits[2 + l]) for l in range(local_crops) for g in range(2)]
    expected = sum(soft_ce(t, s, 0.1) for t, s in pairs) / len(pairs)
    want = torch.autograd.grad(expected, (features, weight))
    loss = DINOLoss(0.1)(features, weight, teacher)
    torch.testing.assert_close(loss, expected)
    for got, reference in zip(torch.autograd.grad(loss, (features, weight)), want):
        torch.testing.assert_close(got, reference)
    with pytest.raises(ValueError, match=r"expected teacher targets \(2, B, K\)"):
        DINOLoss()(features, weight, torch.randn(3, batch, prototypes))
    with pytest.raises(ValueError, match="C >= 2 crops"):
        DINOLoss()(features[: batch + 1], weight, teacher)


def test_ibot_loss_weights_patches_per_crop() -> None:
    torch.manual_seed(0)
    crops, patches, prototypes, width = 6, 16, 24, 5
    masks = torch.rand(crops, patches) < 0.3
    masks[2] = False  # an unmasked crop still counts in the denominator
    count = int(masks.sum())
    features, weight = torch.randn(count, width), torch.randn(prototypes, width)
    student, teacher = features @ weight.T, torch.randn(count, prototypes).softmax(-1)
    expected = torch.tensor(0.0)
    row = 0
    for crop in range(crops):
        n = int(masks[crop].sum())
        if n:
            expected += soft_ce(teacher[row : row + n], student[row : row + n], 0.1)
            row += n
    expected /= crops
    targets = Targets(teacher)
    torch.testing.assert_close(IBOTPatchLoss(0.1)(features, weight, targets, masks), expected)
    index = torch.tensor([crop * patches + p for crop in range(crops) for p in range(patches) if masks[crop, p]])
    torch.testing.assert_close(IBOTPatchLoss(0.1)(features, weight, targets, masks, index), expected)  # as CropBatch gives it
    with pytest.raises(ValueError, match="masked patches"):
        IBOTPatchLoss()(features[:-1], weight, Targets(teacher[:-1]), masks)
    with pytest.raises(ValueError, match=f"{count - 1} masked patches"):
        IBOTPatchLoss()(features, weight, targets, masks, index[:-1])


def test_masked_positions_pad_with_an_unmasked_patch() -> None:
    """Padded to a fixed row count, the index starts with the masked positions in order and
    continues with an unmasked patch, so that the masks read at the index tell the padding."""
    torch.manual_seed(1)
    masks = torch.rand(4, 9) < 0.4
    plain = masked_positions(masks)
    assert torch.equal(plain, torch.tensor([i for i, m in enumerate(masks.flatten().tolist()) if m]))
    padded = masked_positions(masks, len(plain) + 5)
    assert len(padded) == len(plain) + 5 and torch.equal(padded[: len(plain)], plain)
    assert torch.equal(masks.flatten()[padded], torch.arange(len(padded)) < len(plain))
    assert torch.equal(masked_positions(masks, len(plain)), plain)
    with pytest.raises(ValueError, match=f"cannot pad the {len(plain)} masked of 36 patches to {len(plain) - 1}"):
        masked_positions(masks, len(plain) - 1)
    with pytest.raises(ValueError, match="unmasked patch to pad with"):
        masked_positions(torch.ones(2, 3, dtype=torch.bool), 7)


@pytest.mark.parametrize("centred", [False, True])
def test_ibot_loss_gives_padding_rows_no_weight(centred: bool) -> None:
    """The loss and the gradients of the tokens and prototypes are those of the masked patches
    alone when the index is padded (the padding rows are real, unmasked tokens with targets)."""
    torch.manual_seed(2)
    crops, patches, prototypes, width = 4, 12, 20, 6
    masks = torch.rand(crops, patches) < 0.3
    tokens = torch.randn(crops * patches, width)
    teacher = torch.randn(crops * patches, prototypes).softmax(-1)
    teacher_features = torch.randn(crops * patches, width)

    def run(index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, w = tokens.clone().requires_grad_(), torch.randn(prototypes, width, generator=torch.Generator().manual_seed(3))
        w.requires_grad_()
        targets = (Targets(teacher_features[index], w.detach(), torch.randn(1, prototypes), 0.05) if centred
                   else Targets(teacher[index]))
        loss = IBOTPatchLoss(0.1)(x[index], w, targets, masks, index)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    plain = masked_positions(masks)
    torch.manual_seed(4)
    expected = run(plain)
    torch.manual_seed(4)
    for got, want in zip(run(masked_positions(masks, len(plain) + 7)), expected):
        torch.testing.assert_close(got, want)


def explicit_prototype_loss(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            row_weights: torch.Tensor, temp: float) -> torch.Tensor:
    """The unfused reference: logits by ``F.linear``, the cross-entropy by ``F.cross_entropy`` per row."""
    logits = F.linear(features, weight)
    return (F.cross_entropy(logits.float() / temp, targets, reduction="none") * row_weights).sum()


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("block_rows", [3, 100])
@pytest.mark.parametrize("indexed", [False, True])
def test_fused_prototype_loss_matches_autograd_on_the_logits(centred: bool, block_rows: int, indexed: bool) -> None:
    """The fused loss (blocks of rows, gradients made in the forward) against autograd through the
    explicit logits: the value and the gradients of the features and of the prototypes, with
    targets as probabilities or as teacher features and prototypes whose logits are softmaxed about
    a centre, in one block or several, each row's own or (``indexed``) picked from fewer rows."""
    generator = torch.Generator().manual_seed(int(centred) * 10 + block_rows + 100 * indexed)
    rows, prototypes, width, temp = 11, 37, 6, 0.1
    features = torch.randn(rows, width, generator=generator, requires_grad=True)
    weight = torch.randn(prototypes, width, generator=generator, requires_grad=True)
    sources = 4 if indexed else rows
    teacher_features, teacher_weight = torch.randn(sources, 5, generator=generator), torch.randn(prototypes, 5, generator=generator)
    index = torch.randint(0, sources, (rows,), generator=generator) if indexed else None
    picked = teacher_features if index is None else teacher_features[index]
    teacher = picked @ teacher_weight.T  # (rows, K)
    center = torch.randn(1, prototypes, generator=generator)
    row_weights = torch.rand(rows, generator=generator)
    targets = (Targets(teacher_features, teacher_weight, center, 0.04, index=index) if centred else
               Targets((teacher_features @ teacher_weight.T).softmax(-1), index=index))
    assert targets.shape == (rows, prototypes)
    probs = ((teacher - center) / 0.04).softmax(-1) if centred else teacher.softmax(-1)
    torch.testing.assert_close(targets.probs(), probs)
    upstream = 0.7  # the loss weight the step scales it by
    got = prototype_cross_entropy(features, weight, targets, row_weights, temp, block_rows=block_rows)
    got_grads = torch.autograd.grad(got * upstream, [features, weight])
    want = explicit_prototype_loss(features, weight, probs, row_weights, temp)
    want_grads = torch.autograd.grad(want * upstream, [features, weight])
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_fused_prototype_loss_under_bf16_autocast_matches_the_unfused_one() -> None:
    """Under autocast both multiply in bf16 and take the cross-entropy in fp32; the gradients come
    back in the inputs' dtypes."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(64, 16, generator=generator, requires_grad=True)
    targets = torch.randn(40, 64, generator=generator).softmax(-1)
    row_weights = torch.full((40,), 1 / 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = prototype_cross_entropy(features, weight, Targets(targets), row_weights, 0.1, block_rows=16)
        want = explicit_prototype_loss(features, weight, targets, row_weights, 0.1)
    got_grads = torch.autograd.grad(got, [features, weight])
    want_grads = torch.autograd.grad(want, [features, weight])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for g, w, x in zip(got_grads, want_grads, (features, weight)):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g, w, rtol=0.02, atol=0.02 * w.abs().max().item())


def test_fused_prototype_loss_refuses_mismatched_targets() -> None:
    with pytest.raises(ValueError, match="features with both prototypes and a centre"):
        Targets(torch.randn(4, 3), torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"need targets \(rows, prototypes\) and one weight per row"):
        prototype_cross_entropy(torch.randn(4, 3), torch.randn(9, 3), Targets(torch.rand(4, 8)), torch.ones(4), 0.1)


def test_koleo_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((33, 12))
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    distances = cdist(x, x)
    np.fill_diagonal(distances, np.inf)
    expected = -np.log(distances.min(axis=1) + 1e-8).mean()
    loss = KoLeoLoss()(torch.from_numpy(features).float())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(torch.randn(1, 4))


def brute_cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("local_crops", [0, 1, 6])
def test_cls_feature_loss_matches_brute_force(local_crops: int) -> None:
    rng = np.random.default_rng(local_crops)
    batch, dim = 5, 12
    student_global = rng.standard_normal((2, batch, dim))
    student_local = rng.standard_normal((local_crops, batch, dim))
    teacher = rng.standard_normal((2, batch, dim))
    per_crop = [np.mean([brute_cosine_distance(student_global[g, b], teacher[g, b]) for b in range(batch)])
                for g in range(2)]  # each global crop against the teacher's view of the same crop
    per_crop += [np.mean([np.mean([brute_cosine_distance(student_local[l, b], teacher[g, b]) for g in range(2)])
                          for b in range(batch)]) for l in range(local_crops)]  # locals: both views, averaged
    expected = np.mean(per_crop)
    loss = CLSFeatureLoss()(*(torch.from_numpy(x).float() for x in (student_global, student_local, teacher)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="expected 2 global crops"):
        CLSFeatureLoss()(torch.randn(3, batch, dim), None, torch.randn(3, batch, dim))


def test_patch_feature_loss_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    crops, patches, dim = 4, 9, 7
    student, teacher = rng.standard_normal((crops, patches, dim)), rng.standard_normal((crops, patches, dim))
    expected = np.mean([brute_cosine_distance(student[c, p], teacher[c, p])
                        for c in range(crops) for p in range(patches)])
    loss = PatchFeatureLoss()(torch.from_numpy(student).float(), torch.from_numpy(teacher).float())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="equal shapes"):
        PatchFeatureLoss()(torch.randn(crops, patches, dim), torch.randn(crops, patches, dim + 1))


def test_cosine_distance_bounds_scale_and_dtype() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    torch.testing.assert_close(cosine_distance(x, 3 * x), torch.zeros(6), atol=1e-6, rtol=0)  # scale-free
    torch.testing.assert_close(cosine_distance(x, -x), torch.full((6,), 2.0))
    half = cosine_distance(x.half(), torch.randn(6, 5).half())
    assert half.dtype == torch.float32 and bool(((half >= 0) & (half <= 2)).all())
    assert torch.isfinite(cosine_distance(torch.zeros(2, 5), x[:2])).all()  # a zero vector has no direction


def test_sinkhorn_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(40, 16).clamp(-1, 1)
    targets = sinkhorn_knopp(logits, teacher_temp=0.07, iterations=3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(40))  # one distribution per sample
    # Sinkhorn only rescales rows and columns: log Q - t / tau = a_b + c_k (a rank-one sum)
    residual = targets.double().log() - logits.double() / 0.07
    centred = residual - residual.mean(0, keepdim=True) - residual.mean(1, keepdim=True) + residual.mean()
    assert centred.abs().max() < 1e-4
    # more iterations -> every prototype gets an equal share of the batch
    balanced = sinkhorn_knopp(logits, teacher_temp=0.07, iterations=300)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((16,), 40 / 16), rtol=1e-3, atol=1e-3)
    plain = logits.div(0.07).softmax(-1).sum(0)
    assert (balanced.sum(0) - 2.5).abs().max() < (plain - 2.5).abs().max()


def test_sinkhorn_leaves_out_rows_not_valid() -> None:
    """With ``valid``, the targets of the valid rows are Sinkhorn-Knopp's of those rows alone, the
    others zero; no valid row at all gives zeros, not NaN (a rank or step without masked patches)."""
    torch.manual_seed(5)
    logits = torch.randn(30, 12).clamp(-1, 1)
    valid = torch.rand(30) < 0.6
    targets = sinkhorn_knopp(logits, teacher_temp=0.05, valid=valid)
    torch.testing.assert_close(targets[valid], sinkhorn_knopp(logits[valid], teacher_temp=0.05))
    assert torch.equal(targets[~valid], torch.zeros(int((~valid).sum()), 12))
    none = sinkhorn_knopp(logits, teacher_temp=0.05, valid=torch.zeros(30, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(30, 12))


def test_sinkhorn_runs_in_fp32_on_half_inputs() -> None:
    targets = sinkhorn_knopp(torch.randn(8, 10).half(), teacher_temp=0.04)
    assert targets.dtype == torch.float32 and torch.isfinite(targets).all()


def test_softmax_centering() -> None:
    torch.manual_seed(0)
    centering = SoftmaxCentering(6, momentum=0.9)
    first, second = torch.randn(4, 6), torch.randn(2, 3, 6)
    torch.testing.assert_close(centering(first, 0.04), (first / 0.04).softmax(-1))
    centering.update(first)
    expected = 0.1 * first.mean(0, keepdim=True)
    torch.testing.assert_close(centering.center, expected)
    centering.update(second)  # patch logits (C, N, K) are averaged over every patch
    expected = 0.9 * expected + 0.1 * second.reshape(-1, 6).mean(0, keepdim=True)
    torch.testing.assert_close(centering.center, expected)
    torch.testing.assert_close(centering(first, 0.07), ((first - expected) / 0.07).softmax(-1))


def test_dino_head_layout_and_weight_norm() -> None:
    torch.manual_seed(0)
    head = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16)
    assert set(head.state_dict()) == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_g", "last_layer.weight_v",
    }
    with torch.no_grad():
        head.last_layer.weight_g.mul_(torch.rand(100, 1) + 0.5)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1, keepdim=True), head.last_layer.weight_g)
    tokens = torch.randn(3, 7, 48)
    logits = head(tokens)
    assert logits.shape == (3, 7, 100)
    # logits are bounded by the prototype norms: bottleneck features have unit length
    assert (logits.abs() <= head.last_layer.weight_g.squeeze(1) + 1e-5).all()
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 100, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(5, 16)
    torch.testing.assert_close(head.last_layer(x), reference(x))


def test_a_head_given_several_inputs_computes_each_as_alone_and_its_prototypes_once(monkeypatch) -> None:
    """``DINOHead`` on a tuple of row blocks, each with its own ``fused`` (or none: logits), equals
    a call per block, outputs and gradients; the prototype matrix is normalised once for the tuple."""
    torch.manual_seed(0)
    head = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16).double()
    blocks = [torch.randn(rows, 48, dtype=torch.float64) for rows in (5, 11)]
    targets = torch.randn(11, 100, dtype=torch.float64).softmax(-1)

    def cross_entropy(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return -(targets * (features @ prototypes.T).log_softmax(-1)).sum(-1).mean()

    made = []
    monkeypatch.setattr(heads, "normalized_rows", lambda v, g: made.append(v) or normalized_rows(v, g))
    runs = []
    for together in (True, False):
        inputs = [block.detach().clone().requires_grad_() for block in blocks]
        head.zero_grad()
        if together:
            logits, loss = head(tuple(inputs), (None, cross_entropy))
            assert len(made) == 1
        else:
            logits, loss = head(inputs[0]), head(inputs[1], fused=cross_entropy)
        (logits.square().sum() + loss).backward()
        runs.append([logits, loss, *(x.grad for x in inputs), *(p.grad.clone() for p in head.parameters())])
    assert len(made) == 3
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="one fused callable .* per input, got 1 for 2"):
        head(tuple(blocks), (None,))


def test_weight_norm_backward_matches_autograd_and_finite_differences() -> None:
    """The head's hand-written weight-norm backward gives torch's ``weight_norm`` gradients for
    ``v`` and ``g`` (fp64, random rows of several scales), passes ``gradcheck``, and leaves a frozen
    ``g`` without a gradient."""
    torch.manual_seed(0)
    v = (torch.randn(40, 12, dtype=torch.float64) * torch.rand(40, 1, dtype=torch.float64) * 10).requires_grad_()
    g = (torch.rand(40, 1, dtype=torch.float64) + 0.5).requires_grad_()
    upstream = torch.randn(40, 12, dtype=torch.float64)
    normalized_rows(v, g).backward(upstream)
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(12, 40, bias=False).double())
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(g)
        reference.parametrizations.weight.original1.copy_(v)
    reference.weight.backward(upstream)
    torch.testing.assert_close(v.grad, reference.parametrizations.weight.original1.grad)
    torch.testing.assert_close(g.grad, reference.parametrizations.weight.original0.grad)
    torch.testing.assert_close(normalized_rows(v, g), reference.weight)
    assert torch.autograd.gradcheck(normalized_rows, (v[:6, :5].detach().requires_grad_(),
                                                      g[:6].detach().requires_grad_()))
    frozen = g.detach()
    v.grad = None
    normalized_rows(v, frozen).sum().backward()
    assert frozen.grad is None and v.grad is not None


def test_centre_moves_by_column_sums_and_not_without_rows() -> None:
    """The centre's EMA from column sums equals the one from the logits; no rows leave it unchanged
    (a step with no masked patch), where a mean over zero rows would make it NaN."""
    torch.manual_seed(0)
    logits = torch.randn(6, 10)
    from_logits, from_sums = SoftmaxCentering(10), SoftmaxCentering(10)
    from_logits.update(logits)
    from_sums.update_with_sum(logits.sum(dim=0, keepdim=True), 6)
    torch.testing.assert_close(from_sums.center, from_logits.center)
    torch.testing.assert_close(from_logits.center, 0.1 * logits.mean(dim=0, keepdim=True))
    before = from_sums.center.clone()
    from_sums.update(torch.randn(0, 10))
    assert torch.equal(from_sums.center, before)
    from_sums.update_with_sum(torch.zeros(1, 10), torch.tensor(0))  # a count only the device knows
    assert torch.equal(from_sums.center, before)
    from_sums.update_with_sum(logits.sum(dim=0, keepdim=True), torch.tensor(6))
    torch.testing.assert_close(from_sums.center, 0.9 * before + 0.1 * logits.mean(dim=0, keepdim=True))
