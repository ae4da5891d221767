"""The heads a run writes beside its backbone: their settings read back from the tensors, and where
they are found (a run folder, a pipeline's output folder, a training dump; never for released
weights), on file:// and the S3 server."""

from __future__ import annotations

import pytest
import torch

from dinoflow.config import HeadsConfig
from dinoflow.storage import Storage, join_uri
from trainer.engine import SSLNetwork, build_heads
from trainer.models.head_weights import SavedHeads, find_heads, network_heads, save_heads
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit

CASES = [
    HeadsConfig(num_prototypes=40, hidden_dim=24, bottleneck_dim=8, num_layers=3),
    HeadsConfig(num_prototypes=40, hidden_dim=24, bottleneck_dim=8, num_layers=2, ibot_separate_head=True,
                ibot_num_prototypes=56, ibot_bottleneck_dim=12),
    HeadsConfig(num_prototypes=16, bottleneck_dim=8, num_layers=1),
]


def network(heads: HeadsConfig, embed_dim: int = 32) -> SSLNetwork:
    backbone = build_vit("vit_small", embed_dim=embed_dim, depth=1, num_heads=2, patch_size=7, img_size=28)
    return SSLNetwork(backbone, *build_heads(backbone.embed_dim, heads))


@pytest.mark.parametrize("heads", CASES, ids=["three-layers", "separate-ibot", "one-layer"])
def test_settings_are_read_back_from_the_tensors(heads: HeadsConfig, tmp_path) -> None:
    torch.manual_seed(0)
    saved_from = network(heads)
    centres = {"dino_center.center": torch.randn(1, heads.num_prototypes),
               "ibot_center.center": torch.randn(1, heads.ibot_num_prototypes if heads.ibot_separate_head
                                                  else heads.num_prototypes)}
    save_backbone(saved_from.backbone, str(tmp_path / "backbone.safetensors"))
    save_heads(network_heads(saved_from), centres, str(tmp_path / "heads.safetensors"), Storage())
    found = find_heads(str(tmp_path), "auto", Storage())
    assert found is not None and found.uri == str(tmp_path / "heads.safetensors")
    assert set(found.heads) == {k for k in saved_from.state_dict() if not k.startswith("backbone.")}
    for key, value in found.heads.items():
        torch.testing.assert_close(value, saved_from.state_dict()[key], rtol=0, atol=0)
    for key, value in centres.items():
        torch.testing.assert_close(found.centres[key], value, rtol=0, atol=0)
    settings = found.settings()
    expected = {"in_dim": 32, "num_prototypes": heads.num_prototypes, "bottleneck_dim": heads.bottleneck_dim,
                "num_layers": heads.num_layers, "ibot_separate_head": heads.ibot_separate_head}
    if heads.num_layers > 1:
        expected["hidden_dim"] = heads.hidden_dim
    if heads.ibot_separate_head:
        expected |= {"ibot_num_prototypes": heads.ibot_num_prototypes, "ibot_bottleneck_dim": heads.ibot_bottleneck_dim}
    assert settings == expected
    assert found.mismatches(heads, 32) == []


def test_mismatches_name_each_setting_that_differs() -> None:
    torch.manual_seed(0)
    saved = CASES[1]
    found = SavedHeads("h", network_heads(network(saved)))
    ours = saved.model_copy(update={"num_prototypes": 41, "ibot_bottleneck_dim": 13, "hidden_dim": 25})
    assert found.mismatches(ours, 48) == [
        "model width = 48 (the heads: 32)", "heads.num_prototypes = 41 (the heads: 40)",
        "heads.hidden_dim = 25 (the heads: 24)", "heads.ibot_bottleneck_dim = 13 (the heads: 12)"]
    shared = saved.model_copy(update={"ibot_separate_head": False, "ibot_bottleneck_dim": 99})
    assert found.mismatches(shared, 32) == ["heads.ibot_separate_head = False (the heads: True)"]
    unshared = SavedHeads("h", network_heads(network(CASES[0])))  # the iBOT settings of a shared head: unused
    assert unshared.mismatches(CASES[0].model_copy(update={"ibot_num_prototypes": 7}), 32) == []


def test_heads_are_found_beside_a_backbone_and_nowhere_else(storage_root: tuple[Storage, str], tmp_path) -> None:
    storage, root = storage_root
    torch.manual_seed(0)
    net = network(CASES[0])
    run = join_uri(root, "run")
    save_backbone(net.backbone, join_uri(run, "backbone.safetensors"), storage)
    assert find_heads(run, "auto", storage) is None  # a run folder written before heads were saved
    save_heads(network_heads(net), None, join_uri(run, "heads.safetensors"), storage)
    for uri, source in ((run, "auto"), (join_uri(run, "backbone.safetensors"), "auto"),
                        (join_uri(run, "backbone.safetensors"), "safetensors"),
                        (join_uri(run, "backbone.safetensors") + "/", "safetensors")):  # the file storage reads
        found = find_heads(uri, source, storage)
        assert found is not None and found.uri == join_uri(run, "heads.safetensors") and found.centres == {}
    # another name beside them, Meta's layout, a Hugging Face folder: weights without heads
    save_backbone(net.backbone, join_uri(run, "other.safetensors"), storage)
    assert find_heads(join_uri(run, "other.safetensors"), "auto", storage) is None
    released = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(net.backbone.state_dict(), released)
    (tmp_path / "heads.safetensors").write_bytes(b"not read")  # beside a released file: not its heads
    assert find_heads(str(released), "auto", Storage()) is None
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert find_heads(str(tmp_path / "hf"), "auto", Storage()) is None


def test_a_training_dumps_teacher_heads_are_found_in_it(tmp_path) -> None:
    """The original's dump: ``teacher`` wrapper, ``module.`` prefixes; its heads, no centres."""
    torch.manual_seed(0)
    net = network(CASES[1])
    dump = {"teacher": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(dump, tmp_path / "teacher_checkpoint.pth")
    found = find_heads(str(tmp_path / "teacher_checkpoint.pth"), "training", Storage())
    assert found is not None and found.centres == {} and found.settings()["ibot_num_prototypes"] == 56
    for key, value in found.heads.items():
        torch.testing.assert_close(value, net.state_dict()[key], rtol=0, atol=0)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in net.backbone.state_dict().items()}},
               tmp_path / "backbone_only.pth")
    assert find_heads(str(tmp_path / "backbone_only.pth"), "training", Storage()) is None


def test_an_ibot_head_of_another_mlp_is_refused() -> None:
    torch.manual_seed(0)
    heads = network_heads(network(CASES[1]))
    deeper = network_heads(network(CASES[1].model_copy(update={"num_layers": 3})))
    mixed = {**heads, **{k: v for k, v in deeper.items() if k.startswith("ibot_head.")}}
    with pytest.raises(ValueError, match="the iBOT head's MLP differs from the DINO head's"):
        SavedHeads("mixed.safetensors", mixed).settings()
    with pytest.raises(ValueError, match=r"not DINO/iBOT heads \(no dino_head.last_layer.weight_v\)"):
        SavedHeads("x", {"ibot_head.mlp.0.weight": heads["dino_head.mlp.0.weight"]}).settings()
