"""Checkpoints are read as tensors only: a pickle carrying code is refused by every loader, and
wrong keys, shapes, dtypes or non-tensor values fail with a message naming the key."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from dinoflow.storage import Storage
from tests.reliability.helpers import assert_not_run, malicious_checkpoint
from trainer.checkpoints import load_latest_checkpoint, save_checkpoint
from trainer.models.hub import (
    dinov2,
    load_backbone,
    load_strict,
    read_weights,
    save_backbone,
)
from trainer.models.vit import DinoVisionTransformer, vit_arch_kwargs


def small_vit() -> DinoVisionTransformer:
    return DinoVisionTransformer(**vit_arch_kwargs("vit_small", img_size=16, patch_size=4, embed_dim=16, depth=1,
                                                   num_heads=1))


def test_the_payload_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    """Control: the payload is live, so the refusals below prove something."""
    marker = tmp_path / "pwned"
    torch.load(io.BytesIO(malicious_checkpoint(marker)), weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("source", ["official", "training"])
def test_read_weights_refuses_a_pickle_with_code(tmp_path: Path, source: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(malicious_checkpoint(marker, wrap="teacher" if source == "training" else None))
    with pytest.raises(ValueError, match=r"evil\.pth: not a tensor-only torch checkpoint"):
        read_weights(str(path), source, Storage())
    assert_not_run(marker)


def test_backbone_loaders_refuse_a_pickle_with_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(malicious_checkpoint(marker))
    with pytest.raises(ValueError, match="not a tensor-only"):
        dinov2("dinov2_vits14", weights=str(path))
    with pytest.raises(ValueError, match="not a tensor-only"):
        load_backbone(str(path), "official")
    assert_not_run(marker)


@pytest.mark.parametrize("source", ["safetensors", "hf"])
def test_safetensors_sources_refuse_a_pickle(tmp_path: Path, source: str) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 16, "mlp_ratio": 4, "num_hidden_layers": 1,
                                                    "num_attention_heads": 1, "patch_size": 4, "image_size": 16}))
    (folder / "model.safetensors").write_bytes(malicious_checkpoint(marker))
    uri = str(folder / "model.safetensors") if source == "safetensors" else str(folder)
    with pytest.raises(ValueError, match="corrupt safetensors"):
        read_weights(uri, source, Storage())
    assert_not_run(marker)


def test_resume_refuses_a_pickle_with_code(tmp_path: Path) -> None:
    """A planted training checkpoint behind latest.json does not run when a run resumes; it is
    refused naming the file and the global it would have run, not advising an unsafe load."""
    marker = tmp_path / "pwned"
    storage, out = Storage(), str(tmp_path / "run")
    save_checkpoint(storage, out, malicious_checkpoint(marker), step=5)
    with pytest.raises(ValueError, match=r"step_0+5\.pt: not a tensor-only torch checkpoint \(UnpicklingError: "
                                         r"WeightsUnpickler error: Unsupported global") as refused:
        load_latest_checkpoint(storage, out)
    assert "weights_only set to False" not in str(refused.value)
    assert_not_run(marker)


def test_wrong_shapes_name_the_key(tmp_path: Path) -> None:
    model = small_vit()
    state = model.state_dict()
    state["cls_token"] = torch.zeros(1, 1, 32)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    weights, _ = read_weights(str(path), "official", Storage())
    with pytest.raises(ValueError, match=r"wrong shapes: cls_token: file \(1, 1, 32\) vs model \(1, 1, 16\)"):
        load_strict(small_vit(), weights)


def test_missing_and_unexpected_keys_are_named() -> None:
    state = small_vit().state_dict()
    del state["pos_embed"]
    state["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys: pos_embed \| unexpected keys: blocks\.7\.attn\.qkv\.weight"):
        load_strict(small_vit(), state)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_non_float_tensors_for_float_weights_are_refused(dtype: torch.dtype) -> None:
    """An integer or boolean tensor in place of a float weight is a broken file, not a value to cast."""
    state = small_vit().state_dict()
    state["cls_token"] = torch.ones(1, 1, 16, dtype=dtype)
    with pytest.raises(ValueError, match=r"wrong dtypes: cls_token: file torch\.\w+ vs model torch\.float32"):
        load_strict(small_vit(), state)


def test_half_precision_weights_still_load() -> None:
    """Released weights may be fp16/bf16: a float of another width is not a wrong dtype."""
    source = small_vit()
    state = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    model = small_vit()
    load_strict(model, state)
    torch.testing.assert_close(model.cls_token.detach(), source.cls_token.detach().to(torch.bfloat16).float())


def test_non_tensor_values_are_refused(tmp_path: Path) -> None:
    """weights_only admits ints and strings; a weight that is not a tensor must be named, not crash later."""
    state = dict(small_vit().state_dict())
    state["cls_token"] = 3
    path = tmp_path / "ints.pth"
    torch.save(state, path)
    weights, _ = read_weights(str(path), "official", Storage())
    with pytest.raises(ValueError, match=r"not tensors: cls_token \(int\)"):
        load_strict(small_vit(), weights)


def test_corrupt_and_truncated_weight_files_fail_clearly(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_backbone(small_vit(), str(good))
    data = good.read_bytes()
    cases = {"zero.pth": b"", "garbage.pth": b"\x00not a checkpoint" * 10}
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match=f"{name}: not a tensor-only torch checkpoint"):
            read_weights(str(tmp_path / name), "official", Storage())
    for name, payload in {"cut.safetensors": data[: len(data) // 2], "empty.safetensors": b"",
                          "tiny.safetensors": data[:5]}.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match=f"{name}: corrupt safetensors"):
            read_weights(str(tmp_path / name), "safetensors", Storage())


def test_safetensors_with_wrong_shapes_fail_clearly(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in small_vit().state_dict().items()}
    state["patch_embed.proj.weight"] = torch.zeros(16, 3, 2, 2)
    path = tmp_path / "shapes.safetensors"
    path.write_bytes(save_safetensors(state))
    weights, _ = read_weights(str(path), "safetensors", Storage())
    with pytest.raises(ValueError, match=r"wrong shapes: patch_embed\.proj\.weight"):
        load_strict(small_vit(), weights)
