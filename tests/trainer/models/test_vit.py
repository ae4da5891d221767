"""The DINOv2 ViT: official layout, position interpolation, packed multi-crop, drop path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.models.hub import PRETRAINED, infer_arch_kwargs, load_strict, pretrained_arch_kwargs
from trainer.models.layers import Block, PatchEmbed, PickRows, external_parameters, residual, subset_sizes
from trainer.models.vit import DinoVisionTransformer, build_vit, vit_arch_kwargs

# The released backbones, from the reference table (not from our model): width, depth, FFN.
OFFICIAL = {"s": (384, 12, "mlp"), "b": (768, 12, "mlp"), "l": (1024, 24, "mlp"), "g": (1536, 40, "swiglu")}


def official_shapes(letter: str, registers: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``dinov2_vit<letter>14[_reg4]_pretrain.pth`` as the reference lists it."""
    dim, depth, ffn = OFFICIAL[letter]
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim), "pos_embed": (1, 1370, dim), "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        block = {
            "norm1.weight": (dim,), "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "ls1.gamma": (dim,),
            "norm2.weight": (dim,), "norm2.bias": (dim,), "ls2.gamma": (dim,),
        }
        if ffn == "mlp":
            block |= {"mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
                      "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
        else:  # ViT-g: fused SwiGLU, hidden 4096
            block |= {"mlp.w12.weight": (8192, 1536), "mlp.w12.bias": (8192,),
                      "mlp.w3.weight": (1536, 4096), "mlp.w3.bias": (1536,)}
        shapes |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    return shapes


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def meta_model(name: str) -> DinoVisionTransformer:
    with torch.device("meta"):
        return DinoVisionTransformer(**pretrained_arch_kwargs(name))


@pytest.mark.parametrize("letter", list(OFFICIAL))
@pytest.mark.parametrize("registers", [0, 4])
def test_official_checkpoints_load_strictly(letter: str, registers: int) -> None:
    name = f"dinov2_vit{letter}14{'_reg' if registers else ''}"
    shapes = official_shapes(letter, registers)
    load_strict(meta_model(name), meta_state_dict(shapes))
    assert infer_arch_kwargs(meta_state_dict(shapes)) == pretrained_arch_kwargs(name)


def test_bad_checkpoints_name_the_key() -> None:
    shapes = official_shapes("s", 0)
    missing = meta_state_dict({k: v for k, v in shapes.items() if k != "blocks.3.ls2.gamma"})
    with pytest.raises(ValueError, match="missing keys: blocks.3.ls2.gamma"):
        load_strict(meta_model("dinov2_vits14"), missing)
    wrong = meta_state_dict(shapes | {"pos_embed": (1, 257, 384)})
    with pytest.raises(ValueError, match=r"wrong shapes: pos_embed: file \(1, 257, 384\) vs model \(1, 1370, 384\)"):
        load_strict(meta_model("dinov2_vits14"), wrong)
    extra = meta_state_dict(shapes | {"head.weight": (1000, 384)})
    with pytest.raises(ValueError, match="unexpected keys: head.weight"):
        load_strict(meta_model("dinov2_vits14"), extra)
    with pytest.raises(ValueError, match="missing keys: register_tokens"):
        load_strict(meta_model("dinov2_vits14_reg"), meta_state_dict(shapes))


@pytest.mark.parametrize(("name", "low", "high"), [
    ("dinov2_vits14", 21e6, 23e6), ("dinov2_vitb14", 85e6, 88e6),
    ("dinov2_vitl14", 300e6, 306e6), ("dinov2_vitg14", 1.10e9, 1.14e9),
])
def test_parameter_counts(name: str, low: float, high: float) -> None:
    count = sum(p.numel() for p in meta_model(name).parameters())
    assert low < count < high
    assert len(PRETRAINED) == 8


def tiny(registers: int = 0, **overrides: object) -> DinoVisionTransformer:
    torch.manual_seed(0)
    kwargs = dict(img_size=70, patch_size=7, embed_dim=48, depth=3, num_heads=4, layerscale_init=0.5)
    model = build_vit("vit_small", num_register_tokens=registers, **(kwargs | overrides))
    with torch.no_grad():
        for parameter in model.parameters():  # no zero or constant tensor may hide a bug
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def keys_cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def bicubic_matrix(source: int, target: int, scale: float) -> np.ndarray:
    """Resampling matrix of align_corners=False bicubic (a=-0.75) with a given scale factor,
    border samples clamped: written from the definition, independent of torch."""
    matrix = np.zeros((target, source))
    for i in range(target):
        centre = (i + 0.5) / scale - 0.5
        base = int(np.floor(centre))
        for tap in range(base - 1, base + 3):
            matrix[i, min(max(tap, 0), source - 1)] += keys_cubic(centre - tap)
    return matrix


@pytest.mark.parametrize(("height", "width"), [(70, 70), (42, 63), (98, 56)])
def test_non_register_interpolation_follows_the_offset_formula(height: int, width: int) -> None:
    model = tiny(registers=0)
    table = model.pos_embed.detach().double().numpy()[0]
    side, rows, cols = 10, height // 7, width // 7
    grid = table[1:].reshape(side, side, -1)
    if (rows, cols) == (side, side):
        expected = grid
    else:
        row_matrix = bicubic_matrix(side, rows, (rows + 0.1) / side)
        col_matrix = bicubic_matrix(side, cols, (cols + 0.1) / side)
        expected = np.einsum("ri,cj,ijd->rcd", row_matrix, col_matrix, grid)
    ours = model.interpolate_pos_encoding(height, width, torch.float32)[0].detach().numpy()
    np.testing.assert_allclose(ours[0], table[0], atol=1e-6)
    np.testing.assert_allclose(ours[1:].reshape(rows, cols, -1), expected, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(42, 63), (98, 112), (14, 140)])
def test_register_interpolation_matches_pil_antialiased_bicubic(height: int, width: int) -> None:
    model = tiny(registers=4)
    table = model.pos_embed.detach().numpy()[0]
    rows, cols = height // 7, width // 7
    grid = table[1:].reshape(10, 10, -1)
    expected = np.stack([
        np.asarray(Image.fromarray(grid[:, :, d].astype(np.float32), mode="F").resize((cols, rows), Image.BICUBIC))
        for d in range(grid.shape[-1])
    ], axis=-1)
    ours = model.interpolate_pos_encoding(height, width, torch.float32)[0].detach().numpy()
    np.testing.assert_allclose(ours[1:].reshape(rows, cols, -1), expected, atol=2e-5)


@pytest.mark.parametrize("registers", [0, 4])
def test_packed_crops_equal_separate_passes(registers: int) -> None:
    model = tiny(registers)
    torch.manual_seed(1)
    crops = [torch.randn(2, 3, 70, 70), torch.randn(5, 3, 28, 28), torch.randn(1, 3, 42, 63)]
    masks = [torch.rand(2, 100) < 0.4, None, None]
    with torch.no_grad():
        packed = model.forward_features_list(crops, masks)
        for crop, mask, together in zip(crops, masks, packed):
            alone = model.forward_features(crop, mask)
            for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
                torch.testing.assert_close(together[key], alone[key], rtol=0, atol=1e-5)
    assert packed[0]["x_norm_regtokens"].shape == (2, registers, 48)
    assert packed[1]["x_norm_patchtokens"].shape == (5, 16, 48)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_packed_block_gradients_are_the_separate_passes_summed(ffn: str) -> None:
    """A block on packed groups (attention and its projections per group, the rest over all tokens)
    against each group through the block alone: every output row, each input's gradient, and every
    parameter's gradient as the sum of the groups' (fp64, so only the summation order differs)."""
    torch.manual_seed(2)
    block = Block(24, 4, ffn_layer=ffn, layerscale_init=0.3).double()
    shapes = [(3, 9), (5, 4), (1, 6)]
    groups = [torch.randn(b * n, 24, dtype=torch.float64, requires_grad=True) for b, n in shapes]
    upstream = [torch.randn(b * n, 24, dtype=torch.float64) for b, n in shapes]
    packed = torch.cat(groups)
    got = block(packed, shapes)
    got_grads = torch.autograd.grad((got * torch.cat(upstream)).sum(), [*groups, *block.parameters()])
    alone = [block(group, [shape]) for group, shape in zip(groups, shapes)]
    want = sum((a * u).sum() for a, u in zip(alone, upstream))
    want_grads = torch.autograd.grad(want, [*groups, *block.parameters()])
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-12, atol=1e-12)
    names = [f"input {i}" for i in range(len(groups))] + [name for name, _ in block.named_parameters()]
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_masked_patches_are_replaced_by_the_mask_token() -> None:
    model = tiny(registers=4)
    images = torch.randn(2, 3, 70, 70)
    everything = torch.ones(2, 100, dtype=torch.bool)
    with torch.no_grad():
        out = model.forward_features(images, everything)
        other = model.forward_features(torch.randn(2, 3, 70, 70), everything)
        plain = model.forward_features(images)
    torch.testing.assert_close(out["x_prenorm"], other["x_prenorm"])  # image content is gone
    assert not torch.allclose(out["x_prenorm"], plain["x_prenorm"])
    with pytest.raises(ValueError, match="do not match the patch grid"):
        model.forward_features(images, everything[:, :50])


def test_intermediate_layers() -> None:
    model = tiny(registers=4)
    images = torch.randn(2, 3, 70, 42)
    with torch.no_grad():
        features = model.forward_features(images)
        (last,) = model.get_intermediate_layers(images, n=1)
        torch.testing.assert_close(last, features["x_norm_patchtokens"])
        layers = model.get_intermediate_layers(images, n=[0, 2], reshape=True, return_class_token=True)
        raw = model.get_intermediate_layers(images, n=2, norm=False)
    assert len(layers) == 2
    patches, cls = layers[1]
    assert patches.shape == (2, 48, 10, 6) and cls.shape == (2, 48)
    torch.testing.assert_close(cls, features["x_norm_clstoken"])
    torch.testing.assert_close(raw[1], features["x_prenorm"][:, 5:])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(images, n=[3])
    with pytest.raises(ValueError, match=r"blocks \[0, 2, 2\] name a block twice"):  # 2 outputs for 3 names
        model.get_intermediate_layers(images, n=[0, 2, 2])


def test_bad_sizes_are_refused() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="image size 70x50 is not a multiple of the patch size 7"):
        model(torch.randn(1, 3, 70, 50))
    with pytest.raises(ValueError, match="img_size 100 is not a multiple of patch_size 14"):
        build_vit("vit_small", img_size=100, depth=1)
    with pytest.raises(ValueError, match="unknown architecture 'vit_huge'"):
        build_vit("vit_huge")


@pytest.mark.parametrize(("rate", "shapes", "subset"), [
    (0.05, [(20, 5), (40, 3)], False),  # r <= 0.1: the mask, whatever the batch
    (0.4, [(8, 5), (4, 3)], False),  # 4 of 8 would drop 50 %: the mask
    (0.4, [(10, 5), (5, 3)], True),  # 6 of 10 and 3 of 5: exactly 40 %, the subset trick
    (0.25, [(8, 5), (4, 3)], True),
])
def test_drop_path_keeps_the_expectation(rate: float, shapes: list[tuple[int, int]], subset: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(sum(b * n for b, n in shapes), 6)
    weight = torch.randn(6, 6)
    rows_seen: list[int] = []

    def branch(tokens: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        rows_seen.append(sum(b for b, _ in shapes))
        return torch.tanh(tokens @ weight)

    draws = 4000
    total = torch.zeros_like(x)
    for _ in range(draws):
        total += residual(x, shapes, branch, rate)
    # per-sample std of the estimate <= |branch| * sqrt(r / (1 - r) / draws) < 0.02
    torch.testing.assert_close(total / draws, residual(x, shapes, branch, 0.0), rtol=0, atol=0.06)
    batch = sum(b for b, _ in shapes)
    # the subset trick computes the branch on int(B (1 - r)) samples per group, the mask on all
    assert rows_seen[0] == (sum(int(b * (1 - rate)) for b, _ in shapes) if subset else batch)


def test_subset_sizes_keep_the_rate_or_refuse() -> None:
    assert subset_sizes([(128, 261), (512, 54)], 0.4) == [76, 307]  # ViT-L/14's batch: 40.6 %, 40.0 %
    assert subset_sizes([(256, 261), (1024, 54)], 0.1) is None  # ViT-S/14's rate: the mask
    assert subset_sizes([(4, 261), (16, 54)], 0.4) is None  # 2 of 4: 50 %
    assert subset_sizes([(1, 9)], 0.5) is None  # would keep no sample


@pytest.mark.parametrize("size", [(28, 42), (14, 14)])
def test_patch_embedding_is_its_strided_convolution(size: tuple[int, int]) -> None:
    """The matrix-product patch embedding against ``F.conv2d`` with the same weights: values and
    the weights' gradients (the backward the training step takes)."""
    torch.manual_seed(0)
    embed = PatchEmbed(7, 3, 16)
    images = torch.randn(3, 3, *size)
    got = embed(images)
    reference = torch.nn.functional.conv2d(images, embed.proj.weight, embed.proj.bias, stride=7)
    torch.testing.assert_close(got, reference.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(got)
    got_grads = torch.autograd.grad((got * upstream).sum(), [embed.proj.weight, embed.proj.bias])
    want_grads = torch.autograd.grad((reference.flatten(2).transpose(1, 2) * upstream).sum(),
                                     [embed.proj.weight, embed.proj.bias])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_subset_drop_path_runs_under_bf16_autocast() -> None:
    """Under autocast a block's branch returns bf16 (its output projection's product) for the fp32
    residual stream, which the subset path adds back in fp32 (its first form, ``index_add``, needed
    one dtype and failed on the GPU, where training autocasts)."""
    block = Block(24, 4, drop_path=0.5, layerscale_init=0.3).train()
    x, shapes = torch.randn(6 * 9, 24), [(6, 9)]
    torch.manual_seed(1)
    reference = block(x, shapes)
    torch.manual_seed(1)  # the same kept samples
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = block(x, shapes)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("rate", "shapes"), [(0.4, [(10, 5), (5, 3)]), (0.25, [(8, 5), (4, 3), (12, 2)]),
                                            (0.5, [(6, 4)])])
def test_subset_drop_path_is_the_originals_gather_and_index_add(rate: float, shapes: list[tuple[int, int]]) -> None:
    """The subset form (gathers both ways, :class:`PickRows`) against the original's formula written
    out here, ``x.index_add(0, rows, branch(x[rows]) * B / k)`` with the rows of the same draws (one
    ``randperm`` a group, the first ``k`` kept): the output, the input's gradient and the branch's
    weights' gradient, in fp64 on random inputs."""
    torch.manual_seed(0)
    x = torch.randn(sum(b * n for b, n in shapes), 6, dtype=torch.float64)
    weight = torch.randn(6, 6, dtype=torch.float64)
    upstream = torch.randn_like(x)
    kept_shapes: list[list[tuple[int, int]]] = []

    def f(tokens: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # the branch: a function of each row
        return torch.tanh(tokens @ w) * tokens.sum(1, keepdim=True)

    results = []
    for form in ("ours", "original"):
        inputs = (x.clone().requires_grad_(), weight.clone().requires_grad_())
        torch.manual_seed(1)
        if form == "ours":
            out = residual(inputs[0], shapes, lambda t, groups: kept_shapes.append(groups) or f(t, inputs[1]), rate)
        else:
            rows, scales, offset = [], [], 0
            for batch, length in shapes:
                keep = int(batch * (1 - rate))
                kept = torch.randperm(batch)[:keep]
                rows.append((offset + kept.unsqueeze(1) * length + torch.arange(length)).flatten())
                scales.append(torch.full((keep * length, 1), batch / keep, dtype=torch.float64))
                offset += batch * length
            index = torch.cat(rows)
            update = f(inputs[0][index], inputs[1]) * torch.cat(scales)
            out = inputs[0].index_add(0, index, update)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), inputs)))
    assert kept_shapes == [[(int(b * (1 - rate)), n) for b, n in shapes]]
    for ours, original in zip(*results):
        torch.testing.assert_close(ours, original, rtol=1e-12, atol=1e-12)
    assert not torch.equal(results[0][0], x + f(x, weight))  # some samples dropped


@pytest.mark.parametrize("masked_output", [False, True])
def test_pick_rows_gradient_is_the_gather_by_the_inverse(masked_output: bool) -> None:
    """:class:`PickRows` both ways the subset path uses it, by ``gradcheck`` (fp64, random rows):
    picking 5 of 9 source rows (the way in), and spreading 5 rows back over 9 with the others
    zeroed (the way out)."""
    torch.manual_seed(0)
    order = torch.randperm(9)
    index = order[:5]  # output row j <- source row index[j]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(9)
    inverse, picked = torch.where(rank < 5, rank, 0), rank < 5
    if masked_output:  # 5 rows out to 9: output row i <- source row inverse[i] where picked
        source = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        arguments = (source, inverse, picked, index, None)
        expected = torch.zeros(9, 4, dtype=torch.float64).index_copy(0, index, source.detach())
    else:
        source = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
        arguments = (source, index, None, inverse, picked)
        expected = source.detach()[index]
    torch.testing.assert_close(PickRows.apply(*arguments), expected, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda s: PickRows.apply(s, *arguments[1:]), (source,))


def test_compiled_subset_drop_path_scatters_nothing() -> None:
    """A block compiled with the subset drop path moves the kept rows in and out by gathers in its
    forward and backward: inductor's code for it (CPU) has no atomic add, which the original's
    ``index_add`` and its gather's gradient (a scatter into zeros) both compile to, and which on a
    GPU made the subset form slower than the mask it saves a share of the work over."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    block = Block(32, 4, drop_path=0.4, layerscale_init=0.3).train()
    shapes = [(10, 5), (5, 3)]
    x = torch.randn(sum(b * n for b, n in shapes), 32, requires_grad=True)
    assert subset_sizes(shapes, 0.4) == [6, 3]
    torch._dynamo.reset()
    compiled = torch.compile(block.forward, dynamic=False)
    _, codes = run_and_get_code(lambda: compiled(x, shapes).square().sum().backward())
    torch._dynamo.reset()
    assert len(codes) == 2  # the forward's code and the backward's
    assert all("atomic_add" not in code for code in codes)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_drop_path_is_identity_in_eval_mode() -> None:
    torch.manual_seed(0)
    block = Block(24, 4, drop_path=0.4, layerscale_init=0.3)
    plain = Block(24, 4, drop_path=0.0, layerscale_init=0.3)
    plain.load_state_dict(block.state_dict())
    x, shapes = torch.randn(6 * 9, 24), [(6, 9)]
    block.eval()
    torch.testing.assert_close(block(x, shapes), plain(x, shapes), rtol=0, atol=0)
    block.train()
    assert not torch.allclose(block(x, shapes), plain(x, shapes))


def test_linear_drop_path_schedule() -> None:
    kwargs = vit_arch_kwargs("vit_small", depth=5, drop_path_rate=0.4, drop_path_uniform=False)
    model = DinoVisionTransformer(**kwargs)
    assert [round(b.drop_path, 6) for b in model.blocks] == [0.0, 0.1, 0.2, 0.3, 0.4]
    uniform = build_vit("vit_small", depth=3, drop_path_rate=0.3)
    assert [b.drop_path for b in uniform.blocks] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_layer_scale_folded_into_the_projections_is_the_scaled_branch(ffn: str) -> None:
    """The block's branches with gamma folded into their output projections against the explicit
    ``x + gamma * branch(x)`` (branches run unscaled): the output and every parameter's gradient."""
    torch.manual_seed(0)
    block = Block(24, 4, ffn_layer=ffn, layerscale_init=0.3)
    with torch.no_grad():
        block.ls1.gamma.uniform_(-1, 1)
        block.ls2.gamma.uniform_(-1, 1)
    x, shapes = torch.randn(5 * 7 + 3 * 4, 24), [(5, 7), (3, 4)]
    upstream = torch.randn_like(x)
    got = block(x, shapes)
    got_grads = torch.autograd.grad((got * upstream).sum(), list(block.parameters()))
    middle = x + block.ls1.gamma * block.attn(block.norm1(x), shapes)
    want = middle + block.ls2.gamma * block.mlp(block.norm2(middle))
    want_grads = torch.autograd.grad((want * upstream).sum(), list(block.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, _), g, w in zip(block.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_external_parameters_are_the_projections_and_gammas() -> None:
    """What a block reads outside the parameters' own modules (DeepSpeed ZeRO-3 must gather them
    for the reading module's call)."""
    block = Block(24, 4, ffn_layer="swiglu", layerscale_init=0.3)
    pairs = {(id(module), id(parameter)) for module, parameter in external_parameters(block)}
    assert pairs == {(id(block.attn), id(block.attn.proj.weight)), (id(block.attn), id(block.attn.proj.bias)),
                     (id(block.mlp), id(block.mlp.w3.weight)), (id(block.mlp), id(block.mlp.w3.bias)),
                     (id(block), id(block.ls1.gamma)), (id(block), id(block.ls2.gamma))}
    plain = Block(24, 4, layerscale_init=None)
    assert {p for _, p in external_parameters(plain)} == {plain.attn.proj.weight, plain.attn.proj.bias,
                                                          plain.mlp.fc2.weight, plain.mlp.fc2.bias}
