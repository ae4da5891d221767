"""Weight loading and saving: official files, training dumps, safetensors on any storage."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from dinoflow.storage import Storage, join_uri
from trainer.models.hub import (
    convert_training_state_dict,
    dinov2_vits14_reg,
    init_backbone,
    locate_weights,
    load_backbone,
    read_weights,
    save_backbone,
)
from trainer.models.vit import build_vit


def small_model(**overrides: object):
    torch.manual_seed(0)
    kwargs = dict(img_size=56, patch_size=14, embed_dim=64, depth=4, num_heads=2, layerscale_init=1.0)
    model = build_vit("vit_small", **(kwargs | overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def same_outputs(a, b) -> None:
    images = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        torch.testing.assert_close(a.forward_features(images)["x_prenorm"], b.forward_features(images)["x_prenorm"],
                                   rtol=0, atol=0)


def test_safetensors_round_trip_on_any_storage(storage_root: tuple[Storage, str]) -> None:
    storage, root = storage_root
    model = small_model(num_register_tokens=4, embed_dim=40, num_heads=5)  # 8-d heads: not inferable
    uri = join_uri(root, "backbone.safetensors")
    save_backbone(model, uri, storage)
    loaded = load_backbone(uri, "safetensors", storage)
    assert loaded.arch_kwargs == model.arch_kwargs
    same_outputs(model, loaded)


def test_official_pth_loads_with_inferred_architecture(tmp_path: Path) -> None:
    model = small_model(embed_dim=128, num_register_tokens=4, img_size=518)  # 64-d heads like Meta's
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(str(path), "official")
    assert loaded.arch_kwargs["num_heads"] == 2 and loaded.arch_kwargs["interpolate_antialias"]
    same_outputs(model, loaded)


def test_training_dump_with_prefixes_and_chunks(tmp_path: Path) -> None:
    model = small_model()
    dump: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = key.replace(f"blocks.{index}.", f"blocks.{index // 2}.{index}.", 1)  # 2 chunks
        dump[f"module.backbone.{key}"] = value
    dump["module.dino_head.last_layer.weight_g"] = torch.ones(10, 1)
    dump["module.ibot_head.mlp.0.weight"] = torch.ones(3, 3)
    converted = convert_training_state_dict({"teacher": dump})
    assert set(converted) == set(model.state_dict())
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": dump, "iteration": torch.tensor(5)}, path)
    loaded = load_backbone(str(path), "training", arch_kwargs=model.arch_kwargs)
    same_outputs(model, loaded)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_with_code_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    buffer = io.BytesIO()
    torch.save({"cls_token": torch.zeros(1), "payload": _Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not a tensor-only torch checkpoint"):
        read_weights(str(path), "official", Storage())


def test_bad_files_and_sources(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        read_weights(str(garbage), "safetensors", Storage())
    with pytest.raises(ValueError, match="unknown weight source 'timm'; allowed: auto, official, training"):
        read_weights(str(garbage), "timm", Storage())  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_weights(str(tmp_path / "missing.pth"), "official", Storage())


def test_named_constructor_loads_released_layout(tmp_path: Path) -> None:
    reference = dinov2_vits14_reg()  # random init, released layout and hyperparameters
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.02)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(reference.state_dict(), path)
    loaded = dinov2_vits14_reg(weights=str(path))
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), reference.eval()(images), rtol=0, atol=0)
    assert not loaded.training


@pytest.mark.parametrize("registers", [0, 4])
def test_a_recipe_backbone_started_from_released_weights_computes_the_released_model_at_its_size(
        tmp_path: Path, registers: int) -> None:
    """Meta's files hold a 37 x 37 position table (518 px), a recipe's backbone one for its global
    crop: at that crop's size the started backbone equals the released model, which resizes its own
    table (offset 0.1 without registers, antialias with them)."""
    released = small_model(embed_dim=128, num_register_tokens=registers, img_size=140)  # 10 x 10 patches
    with torch.no_grad():
        released.pos_embed.copy_(torch.randn_like(released.pos_embed))  # a table whose resizing shows
    path = tmp_path / "released.pth"
    torch.save(released.state_dict(), path)
    recipe = build_vit("vit_small", num_register_tokens=registers, img_size=56, patch_size=14, embed_dim=128,
                       depth=4, num_heads=2, layerscale_init=1e-5, drop_path_rate=0.1)
    assert recipe.pos_embed.shape[1] == 1 + 4 * 4
    init_backbone(recipe, str(path), "auto", Storage())
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours, theirs = recipe.eval().forward_features(images), released.forward_features(images)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=key)
    assert not torch.equal(recipe.pos_embed, released.pos_embed[:, :17])  # resized, not cut


def test_starting_weights_that_do_not_fit_the_recipe_name_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "released.pth"
    torch.save(small_model(embed_dim=128, num_register_tokens=4, img_size=140).state_dict(), path)
    recipe = build_vit("vit_small", img_size=56, patch_size=14, embed_dim=128, depth=2, num_heads=2)
    before = {k: v.clone() for k, v in recipe.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.depth = 2 \(the weights: 4\); "
                                         r"model.num_register_tokens = 0 \(the weights: 4\)"):
        init_backbone(recipe, str(path), "official", Storage())
    assert all(torch.equal(v, before[k]) for k, v in recipe.state_dict().items())  # untouched


def test_the_weights_layout_from_the_path(tmp_path: Path) -> None:
    storage = Storage()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "backbone.safetensors").write_bytes(b"")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("")
    assert locate_weights(str(tmp_path / "b.safetensors"), storage) == (str(tmp_path / "b.safetensors"), "safetensors")
    assert locate_weights(str(tmp_path / "hf"), storage) == (str(tmp_path / "hf"), "hf")
    assert locate_weights(str(tmp_path / "run"), storage) == (str(tmp_path / "run" / "backbone.safetensors"),
                                                              "safetensors")
    assert locate_weights(str(tmp_path / "dinov2_vits14_pretrain.pth"), storage) == (
        str(tmp_path / "dinov2_vits14_pretrain.pth"), "official")
    with pytest.raises(ValueError, match=r"other is a folder without backbone\.safetensors .* give the weight file"):
        locate_weights(str(tmp_path / "other"), storage)


def test_every_layout_loads_with_source_auto(tmp_path: Path) -> None:
    """auto reads each layout as its named source does: Meta's .pth, safetensors, a run folder, HF."""
    from trainer.models.hf import export_hf

    model = small_model(embed_dim=128, num_register_tokens=4)  # heads of 64 channels, as a .pth implies
    torch.save(model.state_dict(), tmp_path / "released.pth")
    (tmp_path / "run").mkdir()
    save_backbone(model, str(tmp_path / "run" / "backbone.safetensors"))
    export_hf(model, tmp_path / "hf")
    images = torch.randn(2, 3, 56, 56)  # the table's own size: a .pth holds no interpolation settings
    with torch.no_grad():
        expected = model.eval()(images)
        for uri in ("released.pth", "run", "run/backbone.safetensors", "hf"):
            loaded = load_backbone(str(tmp_path / uri), "auto")
            torch.testing.assert_close(loaded(images), expected, rtol=0, atol=1e-5, msg=uri)


def test_a_sharded_hugging_face_folder_loads_on_any_storage(storage_root: tuple[Storage, str],
                                                           tmp_path: Path) -> None:
    """A folder whose ``model.safetensors.index.json`` lists shards (``save_pretrained`` above its shard
    size, the Hub's large models) loads as the single file does, with source hf and auto."""
    import json

    from safetensors.torch import load_file, save

    from trainer.models.hf import export_hf

    storage, root = storage_root
    model = small_model(num_register_tokens=4)
    tensors = load_file(export_hf(model, tmp_path / "hf") / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        storage.write_bytes(join_uri(root, shard), save({key: tensors[key] for key in keys}))
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    storage.write_bytes(join_uri(root, "model.safetensors.index.json"),
                        json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    storage.write_bytes(join_uri(root, "config.json"), (tmp_path / "hf" / "config.json").read_bytes())
    for source in ("hf", "auto"):
        same_outputs(model, load_backbone(root, source, storage))  # type: ignore[arg-type]


def test_a_refused_torch_file_is_named_in_one_line(tmp_path: Path) -> None:
    """torch's refusal runs to a dozen lines and advises loading unsafely: only its reason is kept;
    a safetensors file given as a torch checkpoint is named as one."""
    path = tmp_path / "evil.pth"
    buffer = io.BytesIO()
    torch.save({"cls_token": torch.zeros(1), "payload": _Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError) as refused:
        read_weights(str(path), "official", Storage())
    message = str(refused.value)
    assert "\n" not in message and "weights_only` set to `False`" not in message, message
    assert message.startswith(f"{path}: not a tensor-only torch checkpoint (UnpicklingError: ")
    assert "GLOBAL posix.system" in message, message  # the reason: the payload's call
    safetensors_file = tmp_path / "weights.pth"
    save_backbone(small_model(embed_dim=64), str(safetensors_file))
    with pytest.raises(ValueError, match=r"weights\.pth: not a tensor-only torch checkpoint \(this is a safetensors "
                                         r"file: give source safetensors, or auto\)"):
        read_weights(str(safetensors_file), "official", Storage())
