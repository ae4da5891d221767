"""Hugging Face export: transformers loads our folders and computes the same features, and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dinoflow.storage import Storage
from trainer.models.hf import (
    arch_kwargs_from_hf_config,
    export_hf,
    from_hf_state_dict,
    hf_config,
    to_hf_state_dict,
)
from trainer.models.hub import PRETRAINED, pretrained_arch_kwargs, read_weights
from trainer.models.vit import DinoVisionTransformer, build_vit

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every tensor distinct, non-trivial values, so that a swapped or dropped tensor
    (a LayerScale, a bias, the mask or register tokens) changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2 and "token" not in name and "pos" not in name:  # linear/conv weights
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:  # biases, LayerScale, CLS/mask/register tokens, positions
                param.copy_(0.5 * noise)
    return model.eval()


def vit_s(registers: int, **overrides: object) -> DinoVisionTransformer:
    """The full ViT-S/14 (384 wide, 12 blocks, 6 heads) at 518 px."""
    model = build_vit("vit_small", num_register_tokens=registers, img_size=518, **overrides)
    return randomize(model, seed=registers)


def tiny(**overrides: object) -> DinoVisionTransformer:
    kwargs: dict = {"embed_dim": 64, "depth": 2, "num_heads": 4, "img_size": 56} | overrides
    return randomize(build_vit("vit_small", **kwargs), seed=1)


def load_transformers(folder: Path) -> nn.Module:
    return transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()


def assert_same_features(ours: DinoVisionTransformer, theirs: nn.Module, images: torch.Tensor,
                         masks: torch.Tensor | None = None) -> None:
    """HF's ``last_hidden_state`` is our normalised ``[CLS, registers, patches]``."""
    with torch.inference_mode():
        features = ours.forward_features(images, masks)
        hidden = theirs(pixel_values=images, bool_masked_pos=masks).last_hidden_state
    first_patch = 1 + ours.num_register_tokens
    assert hidden.shape[1] == first_patch + features["x_norm_patchtokens"].shape[1]
    torch.testing.assert_close(hidden[:, 0], features["x_norm_clstoken"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(hidden[:, 1:first_patch], features["x_norm_regtokens"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(hidden[:, first_patch:], features["x_norm_patchtokens"], atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """registers -> (our ViT-S, transformers' model loaded from its export), built once each."""
    cache: dict[int, tuple[DinoVisionTransformer, nn.Module]] = {}

    def get(registers: int) -> tuple[DinoVisionTransformer, nn.Module]:
        if registers not in cache:
            model = vit_s(registers)
            folder = export_hf(model, tmp_path_factory.mktemp("hf") / "vit_s")
            cache[registers] = model, load_transformers(folder)
        return cache[registers]

    return get


# Dinov2Model resizes the position table unlike the original off the native 518 px (see hf.py)
@pytest.mark.parametrize(
    ("registers", "height", "width"),
    [(0, 518, 518), (4, 518, 518), (4, 224, 224), (4, 224, 308)],
    ids=["vit_s-518", "vit_s_reg4-518", "vit_s_reg4-224", "vit_s_reg4-224x308"],
)
def test_transformers_computes_our_features(exported, registers: int, height: int, width: int) -> None:
    model, theirs = exported(registers)
    assert type(theirs).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(2))
    assert_same_features(model, theirs, images)


def test_masked_patches_use_the_mask_token(tmp_path: Path) -> None:
    model = tiny(num_register_tokens=4)
    theirs = load_transformers(export_hf(model, tmp_path / "out"))
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(2, 16, generator=generator) < 0.5
    assert_same_features(model, theirs, torch.randn(2, 3, 56, 56, generator=generator), masks)


@pytest.mark.parametrize("registers", [0, 4])
def test_swiglu_through_transformers(tmp_path: Path, registers: int) -> None:
    model = tiny(ffn_layer="swiglu", num_register_tokens=registers)
    theirs = load_transformers(export_hf(model, tmp_path / "out"))
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    assert_same_features(model, theirs, images)
    # the check can tell the halves apart: with gate and value swapped the features differ
    with torch.no_grad():
        for layer in theirs.encoder.layer:
            gate, up = layer.mlp.gate_proj, layer.mlp.up_proj
            gate.weight, up.weight = up.weight, gate.weight
            gate.bias, up.bias = up.bias, gate.bias
    with pytest.raises(AssertionError):
        assert_same_features(model, theirs, images)


@pytest.mark.parametrize("registers", [0, 4])
def test_module_layout_loads_into_transformers_modules(registers: int) -> None:
    """The ``"module"`` layout is the state dict of transformers 5's modules, tensor for tensor."""
    model = tiny(ffn_layer="swiglu", num_register_tokens=registers)
    config = transformers.AutoConfig.for_model(**hf_config(model.arch_kwargs))
    theirs = transformers.AutoModel.from_config(config).eval()
    theirs.load_state_dict(to_hf_state_dict(model.state_dict(), model.arch_kwargs, layout="module"), strict=True)
    assert_same_features(model, theirs, torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(7)))


VARIANTS = {
    "mlp": {},
    "registers": {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0},
    "swiglu": {"ffn_layer": "swiglu"},
    "no_qkv_bias": {"qkv_bias": False},
    "mlp_ratio_2": {"mlp_ratio": 2.0, "layerscale_init": 1.0, "in_chans": 1},
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("layout", ["module", "checkpoint"])
def test_state_dict_round_trip_is_identical(overrides: dict, layout: str) -> None:
    model = tiny(**overrides)
    ours = model.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(ours, model.arch_kwargs, layout=layout), model.arch_kwargs)
    assert back.keys() == ours.keys()
    for key, tensor in ours.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_config_round_trip_rebuilds_the_same_model(overrides: dict) -> None:
    kwargs = tiny(**overrides).arch_kwargs
    rebuilt = arch_kwargs_from_hf_config(json.loads(json.dumps(hf_config(kwargs))))
    assert rebuilt == kwargs
    assert DinoVisionTransformer(**rebuilt).arch_kwargs == kwargs


def test_config_round_trip_drops_stochastic_depth() -> None:
    kwargs = build_vit("vit_small", depth=2, drop_path_rate=0.3, drop_path_uniform=False).arch_kwargs
    rebuilt = arch_kwargs_from_hf_config(hf_config(kwargs))
    assert rebuilt == kwargs | {"drop_path_rate": 0.0, "drop_path_uniform": True}


@pytest.mark.parametrize("name", list(PRETRAINED))
def test_released_architectures_match_transformers_shapes(name: str) -> None:
    """Full-size layouts (ViT-S to ViT-g, with and without registers), on the meta device."""
    kwargs = pretrained_arch_kwargs(name)
    with torch.device("meta"):
        ours = DinoVisionTransformer(**kwargs).state_dict()
        config = transformers.AutoConfig.for_model(**hf_config(kwargs))
        theirs = transformers.AutoModel.from_config(config).state_dict()
    converted = to_hf_state_dict(ours, kwargs)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_export_folder_loads_back(tmp_path: Path) -> None:
    model = tiny(ffn_layer="swiglu", num_register_tokens=4)
    folder = export_hf(model, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    state_dict, kwargs = read_weights(str(folder), "hf", Storage())
    assert kwargs == model.arch_kwargs
    for key, tensor in model.state_dict().items():
        assert torch.equal(state_dict[key], tensor), key


@pytest.mark.parametrize("registers", [0, 4])
def test_reads_folders_saved_by_transformers(tmp_path: Path, registers: int) -> None:
    """``save_pretrained`` (and the Hub) use the checkpoint layout; weights made by transformers."""
    kwargs = tiny(ffn_layer="swiglu", num_register_tokens=registers).arch_kwargs
    config = transformers.AutoConfig.for_model(**hf_config(kwargs))
    theirs = randomize(transformers.AutoModel.from_config(config), seed=5)
    theirs.save_pretrained(tmp_path / "saved")
    state_dict, loaded_kwargs = read_weights(str(tmp_path / "saved"), "hf", Storage())
    assert loaded_kwargs == kwargs
    model = DinoVisionTransformer(**loaded_kwargs)
    model.load_state_dict(state_dict, strict=True)
    size = (70, 42) if registers else (56, 56)  # Dinov2Model resizes positions differently
    assert_same_features(model.eval(), theirs, torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(6)))


def test_export_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        export_hf(tiny(), tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    export_hf(tiny(), tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("proj_bias", {"proj_bias": False}),
        ("ffn_bias", {"ffn_bias": False}),
        ("layerscale_init", {"layerscale_init": None}),
        ("mlp_ratio", {"mlp_ratio": 2.5}),
        ("interpolate_antialias", {"interpolate_antialias": True}),
    ],
)
def test_what_transformers_cannot_represent_is_refused(tmp_path: Path, field: str, overrides: dict) -> None:
    model = build_vit("vit_small", depth=1, **overrides)
    with pytest.raises(ValueError, match=field):
        hf_config(model.arch_kwargs)
    with pytest.raises(ValueError, match=field):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreign_keys_and_configs_are_refused() -> None:
    model = tiny()
    hf_state = to_hf_state_dict(model.state_dict(), model.arch_kwargs)
    with pytest.raises(ValueError, match="unexpected: classifier.weight"):
        from_hf_state_dict(hf_state | {"classifier.weight": torch.zeros(1)}, model.arch_kwargs)
    hf_state.pop("encoder.layer.1.attention.k_proj.bias")
    with pytest.raises(ValueError, match="encoder.layer.1.attention.k_proj.bias"):
        from_hf_state_dict(hf_state, model.arch_kwargs)
    with pytest.raises(ValueError, match="model_type"):
        arch_kwargs_from_hf_config(hf_config(model.arch_kwargs) | {"model_type": "vit"})
    with pytest.raises(ValueError, match="hidden_act"):
        arch_kwargs_from_hf_config(hf_config(model.arch_kwargs) | {"hidden_act": "relu"})


# off the native size only the register model's position resize is the same in transformers (hf.py)
@pytest.mark.parametrize(("registers", "width"), [(0, 56), (4, 42)])
def test_each_blocks_self_attention_is_the_attention_transformers_returns(tmp_path: Path, registers: int,
                                                                          width: int) -> None:
    """Each block's attention probabilities (the attention maps' source) against those of
    transformers' eager attention on the exported weights: an implementation we did not write."""
    model = tiny(num_register_tokens=registers)
    theirs = transformers.AutoModel.from_pretrained(export_hf(model, tmp_path / "out"), local_files_only=True,
                                                    attn_implementation="eager").eval()
    images = torch.randn(2, 3, 56, width, generator=torch.Generator().manual_seed(5))
    tokens = 1 + registers + 4 * width // 14
    with torch.inference_mode():
        ours = [model.self_attention(images, block) for block in range(model.depth)]
        attentions = theirs(pixel_values=images, output_attentions=True).attentions
        last = model.self_attention(images)  # block -1 by default
    assert len(attentions) == model.depth >= 2 and last.shape == (2, 4, tokens, tokens)
    for block, (mine, expected) in enumerate(zip(ours, attentions)):
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=0, msg=f"block {block}")
    torch.testing.assert_close(last, attentions[-1], atol=1e-5, rtol=0)
    with pytest.raises(AssertionError):  # the check tells the blocks apart
        torch.testing.assert_close(ours[-1], attentions[-2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=f"block {model.depth} out of range: this backbone has {model.depth} blocks"):
        model.self_attention(images, model.depth)
