"""``trainer/models/compile.py``: blocks compiled by inductor compute what eager blocks compute,
keep their parameter names and do not recompile from step to step; a backend that fails (in the
forward or in the backward compiler) leaves the blocks eager, with a warning, and the run going.
The same for the losses' compiled element-wise tails (``loss.compile``).

The failing backends are real ``torch.compile`` backends (callables dynamo calls with the traced
graph) that raise, as a broken compiler toolchain would.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from dinoflow.config import DistillConfig, PretrainConfig, load_config, validate
from trainer.distill import build_student
from trainer.engine import Objective, build_networks
from trainer.losses import DINOLoss, IBOTPatchLoss, SoftmaxCentering, Targets, centered_softmax
from trainer.models.compile import compile_blocks, compile_function, compiled_now, is_compiled
from trainer.models.vit import DinoVisionTransformer, build_vit

SHAPES = [(4, 17), (8, 5)]  # packed groups: 4 global crops of 16 patches + CLS, 8 local of 4 + CLS


def backbone() -> DinoVisionTransformer:
    torch.manual_seed(0)
    return build_vit("vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=7, img_size=28)


def step(model: DinoVisionTransformer, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward on packed global and local crops (masks on the globals):
    the pre-norm tokens of both groups and every parameter's gradient."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(4, 3, 28, 28, generator=generator), torch.randn(8, 3, 14, 14, generator=generator)]
    masks = [torch.rand(4, 16, generator=generator) > 0.5, None]
    model.zero_grad(set_to_none=True)
    outputs = model.forward_features_list(images, masks)
    (outputs[0]["x_norm_clstoken"].square().sum() + outputs[1]["x_norm_patchtokens"].sum()).backward()
    prenorm = torch.cat([o["x_prenorm"].flatten() for o in outputs]).detach()
    return prenorm, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_inductor_blocks_match_eager_keep_their_names_and_compile_once() -> None:
    torch._dynamo.reset()  # other tests' graphs of Block.forward count towards dynamo's recompile limit
    eager = backbone()
    compiled = copy.deepcopy(eager)
    names = list(compiled.state_dict())
    compile_blocks(compiled.blocks)
    assert list(compiled.state_dict()) == names  # no "_orig_mod." anywhere
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    frames_before = counters["frames"]["ok"]
    for seed in (0, 1):
        want_tokens, want_grads = step(eager, seed)
        got_tokens, got_grads = step(compiled, seed)
        torch.testing.assert_close(got_tokens, want_tokens, rtol=1e-4, atol=1e-5)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
        if seed == 0:
            compiled_frames = counters["frames"]["ok"] - frames_before
    assert all(is_compiled(block) for block in compiled.blocks)  # still compiled: no fallback
    assert compiled_frames == 1  # one graph for both blocks and both packed groups...
    assert counters["frames"]["ok"] - frames_before == 1  # ...and no recompilation at the second step
    # a deep copy runs on its own weights, not on the original's
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert twin.forward_features(torch.randn(2, 3, 28, 28))["x_prenorm"].abs().max() == 0


def test_reduce_overhead_blocks_reach_inductor_with_cuda_graphs_and_match_eager_on_cpu() -> None:
    """``mode="reduce-overhead"`` hands inductor its CUDA-graph option (on the CPU inductor declines,
    counting a skip: the mode arrived) and the blocks still compute what eager blocks compute, step
    after step, with each step marked as CUDA graphs need."""
    torch._dynamo.reset()
    eager = backbone()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled.blocks, mode="reduce-overhead")
    skips = counters["inductor"]["cudagraph_skips"]
    for seed in (0, 1):
        torch.compiler.cudagraph_mark_step_begin()
        got_tokens, got_grads = step(compiled, seed)
        want_tokens, want_grads = step(eager, seed)
        torch.testing.assert_close(got_tokens, want_tokens, rtol=1e-4, atol=1e-5)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert all(is_compiled(block) for block in compiled.blocks)
    assert counters["inductor"]["cudagraph_skips"] > skips  # inductor was asked for CUDA graphs


def test_compile_modes_are_checked() -> None:
    with pytest.raises(ValueError, match="'fastest' is not one of"):
        compile_blocks(backbone().blocks, mode="fastest")
    with pytest.raises(ValueError, match="inductor mode"):
        compile_blocks(backbone().blocks, backend="eager", mode="reduce-overhead")
    with pytest.raises(ValueError, match="needs model.compile_blocks = true"):
        load_config(PretrainConfig, "tiny", ["model.compile_mode=reduce-overhead"])
    with pytest.raises(ValueError, match="distributed.strategy = 'single', not 'fsdp2'"):
        load_config(PretrainConfig, "tiny", ["model.compile_blocks=true", "model.compile_mode=reduce-overhead",
                                             "distributed.strategy=fsdp2"])
    cfg = load_config(PretrainConfig, "tiny", ["model.compile_blocks=true", "model.compile_mode=max-autotune-no-cudagraphs",
                                               "distributed.strategy=fsdp2"])
    assert cfg.model.compile_mode == "max-autotune-no-cudagraphs"  # no CUDA graphs: any strategy


def _refuse(graph: torch.fx.GraphModule, example_inputs: list) -> None:
    raise RuntimeError("no compiler on this machine")


def test_a_failing_backend_leaves_the_blocks_eager_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    eager, compiled = backbone(), backbone()
    compile_blocks(compiled.blocks, backend=_refuse)
    with caplog.at_level(logging.WARNING, logger="trainer.models.compile"):
        got = step(compiled, 0)
        step(compiled, 1)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "torch.compile failed for 2 Block blocks" in warnings[0] and "no compiler on this machine" in warnings[0]
    assert not any(is_compiled(block) for block in compiled.blocks)  # back to the class's forward
    want = step(eager, 0)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][n], g) for n, g in want[1].items())


def test_a_failing_backward_compiler_is_caught_at_the_forward_call(caplog: pytest.LogCaptureFixture) -> None:
    """AOTAutograd would compile the backward at ``loss.backward()``, beyond the fallback's reach:
    it is lowered when the forward compiles, so its failure falls back there."""
    eager, compiled = backbone(), backbone()
    compile_blocks(compiled.blocks, backend=aot_autograd(fw_compiler=lambda graph, inputs: graph, bw_compiler=_refuse))
    with caplog.at_level(logging.WARNING, logger="trainer.models.compile"):
        got = step(compiled, 0)
    assert any("no compiler on this machine" in r.getMessage() for r in caplog.records)
    want = step(eager, 0)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][n], g) for n, g in want[1].items())


def test_the_trainers_compile_blocks_when_the_recipe_says_so() -> None:
    small = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "heads.num_prototypes=64",
             "heads.hidden_dim=64", "heads.bottleneck_dim=16"]
    plain = build_networks(load_config(PretrainConfig, "tiny", small))
    networks = build_networks(load_config(PretrainConfig, "tiny", [*small, "model.compile_blocks=true"]))
    for network, reference in zip(networks, plain):
        assert all(is_compiled(block) for block in network.backbone.blocks)
        assert list(network.state_dict()) == list(reference.state_dict())
    assert not any(is_compiled(block) for block in plain[0].backbone.blocks)
    cfg = validate(DistillConfig, {**load_config(PretrainConfig, "tiny", [*small, "model.compile_blocks=true"])
                                   .model_dump(), "teacher": {"uri": "unused"}})
    student, student_ema = build_student(cfg)
    assert all(is_compiled(block) for block in student.backbone.blocks)
    assert not any(is_compiled(block) for block in student_ema.backbone.blocks)
    graphs = build_networks(load_config(PretrainConfig, "tiny", [*small, "model.compile_blocks=true",
                                                                 "model.compile_mode=reduce-overhead"]))[1]
    skips = counters["inductor"]["cudagraph_skips"]
    with torch.no_grad():
        graphs.backbone.forward_features(torch.randn(2, 3, 28, 28))
    assert counters["inductor"]["cudagraph_skips"] > skips  # the recipe's mode reached inductor


def _loss_terms(compiled: bool, seed: int, masked: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The fused DINO loss on bf16 CLS features (as autocast makes them) of 2 global and 4 local
    crops against targets from the centred softmax, and the fused iBOT loss on bf16 features against
    centred teacher logits (of teacher features and prototypes), with ``masked`` iBOT rows: the loss
    values, the new centre, the gradients."""
    generator = torch.Generator().manual_seed(seed)
    batch, prototypes, width = 3, 40, 8
    dino, ibot = DINOLoss(0.1, compiled), IBOTPatchLoss(0.1, compiled)
    center = SoftmaxCentering(prototypes, compiled=compiled)
    center.center.normal_(generator=generator)
    teacher = torch.randn(2, batch, prototypes, generator=generator).bfloat16()
    cls = torch.randn(6 * batch, width, generator=generator).bfloat16().requires_grad_()
    dino_weight = torch.randn(prototypes, width, generator=generator).requires_grad_()
    features = torch.randn(masked, width, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(prototypes, width, generator=generator).requires_grad_()
    masks = torch.zeros(2 * batch, 8, dtype=torch.bool)
    masks.view(-1)[torch.randperm(masks.numel(), generator=generator)[:masked]] = True
    teacher_features = torch.randn(masked, width, generator=generator).bfloat16()
    teacher_weight = torch.randn(prototypes, width, generator=generator)
    targets = center(teacher, 0.04)
    patch_targets = Targets(teacher_features, teacher_weight, center.center.clone(), 0.04)
    center.update(teacher)
    losses = [dino(cls, dino_weight, targets.view(2, batch, -1)), ibot(features, weight, patch_targets, masks)]
    sum(losses).backward()
    assert all(compiled_now(f) == compiled for f in (dino.tail, ibot.tail, center.softmax))
    return [*losses, targets, center.center.clone()], [t.grad for t in (cls, dino_weight, features, weight)]


def test_compiled_losses_match_eager_and_follow_a_changing_row_count() -> None:
    """Inductor's fused cross-entropies and centred softmax (``loss.compile``) against the eager
    maths, forward and backward, at two iBOT row counts (the second makes the rows dynamic)."""
    counters.clear()
    for seed, masked in ((0, 7), (1, 11), (2, 5)):
        want, want_grads = _loss_terms(False, seed, masked)
        got, got_grads = _loss_terms(True, seed, masked)
        for g, w in zip([*got, *got_grads], [*want, *want_grads]):
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-4, atol=1e-5)
    # the centred softmax, the fused tail with probabilities (DINO) and with a centre (iBOT), each
    # once static and once with dynamic rows, never per count
    assert counters["stats"]["unique_graphs"] <= 6, counters["stats"]


def test_compiled_sinkhorn_knopp_matches_eager_at_changing_row_counts() -> None:
    """``loss.compile``'s Sinkhorn-Knopp targets (the objective's, on bf16 logits) equal the eager ones."""
    small = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "heads.num_prototypes=64",
             "loss.centering=sinkhorn_knopp"]
    eager, compiled = (Objective(load_config(PretrainConfig, "tiny", [*small, f"loss.compile={c}"])) for c in (False, True))
    generator = torch.Generator().manual_seed(0)
    for rows in (9, 13, 6):
        logits = torch.randn(rows, 64, generator=generator).bfloat16()
        torch.testing.assert_close(compiled.targets(logits, compiled.ibot_center, 0.05),
                                   eager.targets(logits, eager.ibot_center, 0.05), rtol=1e-5, atol=1e-7)
    assert compiled.tails_compiled() and not eager.tails_compiled()


def test_a_failing_compiled_function_runs_eagerly_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    softmax_of = compile_function(centered_softmax, backend=_refuse)
    logits, center = torch.randn(4, 6), torch.randn(1, 6)
    with caplog.at_level(logging.WARNING, logger="trainer.models.compile"):
        got = [softmax_of(logits, center, 0.1) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "torch.compile failed for centered_softmax" in warnings[0] and "no compiler on this machine" in warnings[0]
    assert not compiled_now(softmax_of) and compiled_now(compile_function(centered_softmax))
    assert all(torch.equal(g, centered_softmax(logits, center, 0.1)) for g in got)
