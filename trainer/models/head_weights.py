"""The DINO/iBOT heads a run trains beside its backbone: written, found and checked to start from.

Why: the released model is a backbone, but continuing self-supervised training from it with new
heads wastes what the heads learned: the first steps fit new prototypes to targets that mean
nothing yet, while the backbone drifts under them (the original's users asked for the heads for
this, and to distil from a teacher's trained heads: its #119). So a run also writes its released
network's heads and the teacher's running centres (``heads.safetensors`` beside
``backbone.safetensors``), and a new run (``init_heads=auto``) or a distillation teacher starts
from them.

Layout: ``dino_head.*`` and, for a separate iBOT head, ``ibot_head.*``, named as
:class:`~trainer.models.heads.DINOHead` names them (the original's layout: a training dump's
teacher heads read the same); ``objective.*`` the centres (none saved: they start at zero).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from dinoflow.run_files import BACKBONE_FILE, HEADS_FILE
from dinoflow.storage import Storage, basename
from trainer.models.hub import (
    Source,
    convert_training_heads,
    locate_weights,
    read_safetensors,
    read_torch_checkpoint,
)

HEAD_NAMES = ("dino_head", "ibot_head")
CENTRES = "objective."


@dataclass
class SavedHeads:
    """Heads read from ``uri``: their tensors (``dino_head.*``, ``ibot_head.*``) and the centres
    saved with them (``Objective`` state keys; empty when none were)."""

    uri: str
    heads: dict[str, Tensor]
    centres: dict[str, Tensor] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The recipe's ``heads.*`` values these tensors fix, and ``in_dim``: the backbone width they
        take. Shapes, not metadata: a training dump's heads have none."""
        dino = self._head("dino_head")
        found = {"in_dim": dino["in_dim"], "num_prototypes": dino["prototypes"],
                 "bottleneck_dim": dino["bottleneck"], "num_layers": dino["layers"],
                 "ibot_separate_head": any(k.startswith("ibot_head.") for k in self.heads)}
        if dino["hidden"] is not None:
            found["hidden_dim"] = dino["hidden"]
        if found["ibot_separate_head"]:
            ibot = self._head("ibot_head")
            if (ibot["in_dim"], ibot["layers"], ibot["hidden"]) != (dino["in_dim"], dino["layers"], dino["hidden"]):
                raise ValueError(f"{self.uri}: the iBOT head's MLP differs from the DINO head's (input, depth or "
                                 "width): the recipe's heads.* share them")
            found |= {"ibot_num_prototypes": ibot["prototypes"], "ibot_bottleneck_dim": ibot["bottleneck"]}
        return found

    def _head(self, name: str) -> dict[str, Any]:
        try:
            prototypes, bottleneck = self.heads[f"{name}.last_layer.weight_v"].shape
            first = self.heads[f"{name}.mlp.0.weight"]
        except KeyError as err:
            raise ValueError(f"{self.uri}: not DINO/iBOT heads (no {err.args[0]})") from None
        layers = sum(1 for k in self.heads if k.startswith(f"{name}.mlp.") and k.endswith(".weight"))
        return {"prototypes": prototypes, "bottleneck": bottleneck, "in_dim": first.shape[1], "layers": layers,
                "hidden": first.shape[0] if layers > 1 else None}

    def mismatches(self, heads: Any, embed_dim: int) -> list[str]:
        """What differs between these heads and a recipe's ``heads`` (a ``HeadsConfig``) on a backbone
        of width ``embed_dim``, each as ``"<setting> = <recipe's> (the heads: <theirs>)"``."""
        found = self.settings()
        width = found.pop("in_dim")
        differ = [f"model width = {embed_dim} (the heads: {width})"] if width != embed_dim else []
        unused = () if heads.ibot_separate_head else ("ibot_num_prototypes", "ibot_bottleneck_dim")  # a shared head's
        return differ + [f"heads.{name} = {getattr(heads, name)!r} (the heads: {theirs!r})"
                         for name, theirs in found.items() if name not in unused and getattr(heads, name) != theirs]


def heads_of(network: nn.Module) -> nn.ModuleDict:
    """An ``SSLNetwork``'s heads under their names: its state is the heads' layout (empty for a
    network without heads, e.g. a distillation's feature student)."""
    return nn.ModuleDict({name: getattr(network, name) for name in HEAD_NAMES
                          if getattr(network, name, None) is not None})


def network_heads(network: nn.Module, state_of: Callable[[nn.Module], Mapping[str, Tensor]] | None = None
                  ) -> dict[str, Tensor]:
    """The head entries of an ``SSLNetwork`` (``dino_head.*``, and ``ibot_head.*`` when separate);
    ``state_of`` gives a module's whole state (a strategy's ``full_state_dict`` for sharded
    heads: every rank must call this then)."""
    read = state_of or (lambda module: module.state_dict())
    return {f"{name}.{key}": value for name, head in heads_of(network).items() for key, value in read(head).items()}


def save_heads(heads: Mapping[str, Tensor], centres: Mapping[str, Tensor] | None, uri: str,
               storage: Storage) -> None:
    """Write heads (:func:`network_heads`) and the ``Objective``'s centres, if given, atomically."""
    tensors = {key: value.detach().contiguous().cpu() for key, value in heads.items()}
    tensors |= {CENTRES + key: value.detach().contiguous().cpu() for key, value in (centres or {}).items()}
    storage.write_bytes(uri, save_safetensors_bytes(tensors))


def find_heads(uri: str, source: Source, storage: Storage,
               dump: Mapping[str, Any] | None = None) -> SavedHeads | None:
    """The heads trained with the weights at ``uri`` (read as ``source``), or ``None`` when they have
    none: a ``heads.safetensors`` beside a ``backbone.safetensors`` (a run folder, a pipeline's
    output folder), or a training dump's teacher heads (``dump``: the dump already read). Released
    backbones and Hugging Face folders come without heads."""
    if source == "auto":
        uri, source = locate_weights(uri, storage)
    if source == "training":
        if dump is None:
            dump = read_torch_checkpoint(storage.read_bytes(uri), uri)
        heads = convert_training_heads(dump)
        return SavedHeads(uri, heads) if heads else None
    if source != "safetensors" or basename(uri) != BACKBONE_FILE:
        return None
    beside = uri.rstrip("/")[: -len(BACKBONE_FILE)] + HEADS_FILE
    if not storage.exists(beside):
        return None
    tensors = read_safetensors(storage.read_bytes(beside), beside)
    return SavedHeads(beside, {k: v for k, v in tensors.items() if not k.startswith(CENTRES)},
                      {k.removeprefix(CENTRES): v for k, v in tensors.items() if k.startswith(CENTRES)})
