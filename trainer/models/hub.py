"""Named backbones and their weights: constructors, loading from any path or URI, saving.

Why explicit sources: a weight file's layout is declared (``source=``), never guessed from its
keys. Each source has one pure converter to our (the official) layout:

* ``official``: Meta's released ``dinov2_vit*14[_reg4]_pretrain.pth`` (already our layout);
* ``training``: the original's training dumps (``{"teacher": ...}`` with ``backbone.``,
  ``module.`` prefixes, and ``blocks.<chunk>.<index>.`` keys of block-chunked models);
* ``safetensors``: our own files, whose metadata carries the architecture;
* ``hf``: a Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` folder.

Checkpoints are read as tensors only (``torch.load(weights_only=True)`` or safetensors), and
loading is strict: a missing, unexpected or mis-shaped key fails with a message naming it.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from dinoflow.run_files import BACKBONE_FILE
from dinoflow.storage import Storage, join_uri
from trainer.models.vit import ARCHITECTURES, DinoVisionTransformer, resize_positions, vit_arch_kwargs

Source = Literal["auto", "official", "training", "safetensors", "hf"]  # auto: :func:`locate_weights`
SOURCES: tuple[str, ...] = ("auto", "official", "training", "safetensors", "hf")
ARCH_METADATA_KEY = "dinoflow.arch_kwargs"

# name -> (architecture, register tokens); released weights: 518 px table, LayerScale stored
PRETRAINED: dict[str, tuple[str, int]] = {
    f"dinov2_vit{letter}14{suffix}": (arch, registers)
    for letter, arch in (("s", "vit_small"), ("b", "vit_base"), ("l", "vit_large"), ("g", "vit_giant2"))
    for suffix, registers in (("", 0), ("_reg", 4))
}


def pretrained_arch_kwargs(name: str) -> dict[str, Any]:
    """Constructor arguments of a released backbone (as the original hub builds it)."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(PRETRAINED)}")
    arch, registers = PRETRAINED[name]
    return vit_arch_kwargs(arch, num_register_tokens=registers, img_size=518, layerscale_init=1.0)


def dinov2(name: str, weights: str | None = None, storage: Storage | None = None,
           source: Source = "official") -> DinoVisionTransformer:
    """A released backbone by name, with weights from a local path or URI when given."""
    model = DinoVisionTransformer(**pretrained_arch_kwargs(name))
    if weights is not None:
        state_dict, _ = read_weights(weights, source, storage or Storage())
        load_strict(model, state_dict)
    return model.eval()


def _constructor(name: str) -> Callable[..., DinoVisionTransformer]:
    def build(weights: str | None = None, storage: Storage | None = None,
              source: Source = "official") -> DinoVisionTransformer:
        return dinov2(name, weights, storage, source)

    arch, registers = PRETRAINED[name]
    build.__name__ = name
    build.__doc__ = (f"DINOv2 {arch} /14{' with 4 registers' if registers else ''}; "
                     "weights from a local path or URI (nothing is downloaded).")
    return build


dinov2_vits14 = _constructor("dinov2_vits14")
dinov2_vits14_reg = _constructor("dinov2_vits14_reg")
dinov2_vitb14 = _constructor("dinov2_vitb14")
dinov2_vitb14_reg = _constructor("dinov2_vitb14_reg")
dinov2_vitl14 = _constructor("dinov2_vitl14")
dinov2_vitl14_reg = _constructor("dinov2_vitl14_reg")
dinov2_vitg14 = _constructor("dinov2_vitg14")
dinov2_vitg14_reg = _constructor("dinov2_vitg14_reg")


# -- converters (pure: state dict in, state dict out) ---------------------------------------

def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released backbone files are already in our layout."""
    return dict(state_dict)


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


_HEADS = ("dino_head.", "ibot_head.")


def _training_entries(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A training dump's network entries: ``teacher``/``model`` unwrapped, ``module.`` stripped."""
    state = checkpoint
    for wrapper in ("teacher", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    return {key.removeprefix("module."): value for key, value in state.items()}


def convert_training_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The backbone of a training dump: unwrap ``teacher``/``model``, strip ``module.`` and
    ``backbone.``, drop the heads, and turn chunked ``blocks.C.N.`` keys into ``blocks.N.``."""
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", key.removeprefix("backbone.")): value
            for key, value in _training_entries(checkpoint).items() if not key.startswith(_HEADS)}


def convert_training_heads(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The DINO/iBOT heads of a training dump (``dino_head.*``, ``ibot_head.*``; none: empty),
    in our layout (the original's: :class:`~trainer.models.heads.DINOHead`)."""
    return {key: value for key, value in _training_entries(checkpoint).items() if key.startswith(_HEADS)}


def infer_arch_kwargs(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture of an official-family backbone from its tensor shapes (64-d heads).

    Released ``.pth`` files carry no config; their shapes determine it. Models with other head
    widths must be saved with metadata (:func:`save_backbone`) or given ``arch_kwargs``.
    """
    try:
        embed_dim = state_dict["cls_token"].shape[-1]
        patch = state_dict["patch_embed.proj.weight"].shape[-1]
        grid = (state_dict["pos_embed"].shape[1] - 1) ** 0.5
    except KeyError as err:
        raise ValueError(f"cannot infer the architecture: key {err} missing") from None
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    swiglu = "blocks.0.mlp.w12.weight" in state_dict
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0] if not swiglu else 4 * embed_dim
    matches = [a for a, spec in ARCHITECTURES.items() if spec["embed_dim"] == embed_dim]
    arch = matches[0] if matches else "vit_small"
    return vit_arch_kwargs(
        arch, num_register_tokens=registers, img_size=int(round(grid)) * patch, patch_size=patch,
        embed_dim=embed_dim, depth=depth, num_heads=max(embed_dim // 64, 1),
        mlp_ratio=hidden / embed_dim, ffn_layer="swiglu" if swiglu else "mlp",
        layerscale_init=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
    )


# -- reading and writing --------------------------------------------------------------------

def read_weights(uri: str, source: Source, storage: Storage,
                 dump: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a weight file or folder into our layout; returns (state dict, arch kwargs or None).
    ``dump``: a training dump's mapping already read from ``uri`` (:func:`read_torch_checkpoint`)."""
    if source not in SOURCES:
        raise ValueError(f"unknown weight source {source!r}; allowed: {', '.join(SOURCES)}")
    if source == "auto":
        uri, source = locate_weights(uri, storage)
    if source == "training" and dump is not None:
        return convert_training_state_dict(dump), None
    if source == "hf":
        from trainer.models.hf import arch_kwargs_from_hf_config, from_hf_state_dict

        config = json.loads(storage.read_bytes(join_uri(uri, "config.json")))
        arch_kwargs = arch_kwargs_from_hf_config(config)
        return from_hf_state_dict(read_hf_tensors(uri, storage), arch_kwargs), arch_kwargs
    data = storage.read_bytes(uri)
    if source == "safetensors":
        arch_kwargs = _safetensors_arch(data, uri)
        return read_safetensors(data, uri), arch_kwargs
    checkpoint = read_torch_checkpoint(data, uri)
    if source == "training":
        return convert_training_state_dict(checkpoint), None
    return convert_official_state_dict(checkpoint), None


def saved_arch_kwargs(uri: str, source: Source, storage: Storage) -> dict[str, Any] | None:
    """The architecture the weights at ``uri`` save beside their tensors, read without the tensors:
    a safetensors header's (:func:`save_backbone`'s metadata; two ranged reads) or a Hugging Face
    folder's ``config.json``; None for layouts that save none (Meta's ``.pth``, a training dump, a
    safetensors file without it), whose architecture is their tensors' shapes (:func:`infer_arch_kwargs`).
    Why: a resumed fine-tuning run builds its backbone from them, then loads its checkpoint's tensors."""
    if source == "auto":
        uri, source = locate_weights(uri, storage)
    if source == "hf":
        from trainer.models.hf import arch_kwargs_from_hf_config

        return arch_kwargs_from_hf_config(json.loads(storage.read_bytes(join_uri(uri, "config.json"))))
    if source != "safetensors":
        return None
    length = storage.read_range(uri, 0, 8)
    return _safetensors_arch(length + storage.read_range(uri, 8, int.from_bytes(length, "little")), uri)


HF_WEIGHTS_FILE, HF_INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def read_hf_tensors(uri: str, storage: Storage) -> dict[str, Tensor]:
    """The tensors of the Hugging Face folder ``uri``, in its own layout: the shards its
    ``model.safetensors.index.json`` lists, else ``model.safetensors``. Why both: ``save_pretrained``
    and the Hub split a model over shards above a size (ViT-g's 4.4 GB), a small one is one file."""
    index_uri = join_uri(uri, HF_INDEX_FILE)
    if storage.exists(index_uri):
        index = json.loads(storage.read_bytes(index_uri))
        files = sorted(set(index["weight_map"].values()))
    else:
        files = [HF_WEIGHTS_FILE]
    tensors: dict[str, Tensor] = {}
    for name in files:
        file_uri = join_uri(uri, name)
        tensors.update(read_safetensors(storage.read_bytes(file_uri), file_uri))
    return tensors


def read_torch_checkpoint(data: bytes, uri: str) -> Mapping[str, Any]:
    """A torch checkpoint's mapping, read as tensors only; anything else fails naming ``uri``."""
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickles with code, corrupt files: one message
        raise ValueError(f"{uri}: not a tensor-only torch checkpoint ({_load_refusal(err, data)})") from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{uri}: expected a state dict, found {type(checkpoint).__name__}")
    return checkpoint


def read_safetensors(data: bytes, uri: str) -> dict[str, Tensor]:
    """A safetensors file's tensors; a corrupt file fails naming ``uri``."""
    try:
        return load_safetensors_bytes(data)
    except Exception as err:  # noqa: BLE001 - the Rust error type is not importable
        raise ValueError(f"{uri}: corrupt safetensors file ({err})") from None


def _safetensors_arch(data: bytes, uri: str) -> dict[str, Any] | None:
    """The architecture saved in a safetensors header by :func:`save_backbone`, if any."""
    text = safetensors_metadata(data, uri).get(ARCH_METADATA_KEY)
    return json.loads(text) if text else None


def safetensors_metadata(data: bytes, uri: str) -> dict[str, str]:
    """The text metadata of a safetensors file's header (empty when it has none)."""
    header_length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{uri}: corrupt safetensors header ({err})") from None
    return header.get("__metadata__", {}) if isinstance(header, dict) else {}


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy weights into ``model``; every key must exist as a tensor with the right shape and a
    compatible dtype (a float of any width for a float weight), and no extras."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state_dict.items()
                   if k in expected and not isinstance(v, Tensor)]
    if not_tensors:  # weights_only admits ints, strings and lists; nothing below can compare them
        raise ValueError(f"weights do not fit the model: values that are not tensors: {', '.join(not_tensors[:10])}")
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    wrong_dtypes = [
        f"{k}: file {state_dict[k].dtype} vs model {expected[k].dtype}"
        for k in expected
        if k in state_dict and state_dict[k].dtype.is_floating_point != expected[k].dtype.is_floating_point
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if mismatched:
        problems.append(f"wrong shapes: {'; '.join(mismatched[:10])}")
    if wrong_dtypes:
        problems.append(f"wrong dtypes: {'; '.join(wrong_dtypes[:10])}")
    if problems:
        raise ValueError("weights do not fit the model: " + " | ".join(problems))
    meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(dict(state_dict), strict=True, assign=meta)


_TORCH_LOAD_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)",
                           "(2)")


def _load_refusal(err: Exception, data: bytes) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``data``, in one line: its reason without the
    paragraph that follows it (which advises loading the file unsafely); a safetensors file given
    as a torch checkpoint is named as one."""
    if len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8:
        return "this is a safetensors file: give source safetensors, or auto"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in lines if not line.startswith(_TORCH_LOAD_BOILERPLATE)), lines[0] if lines else "")
    return f"{type(err).__name__}: {reason[:200]}"


def locate_weights(uri: str, storage: Storage) -> tuple[str, Source]:
    """Where the weights ``uri`` names are, and their layout, from the path: ``*.safetensors`` ->
    safetensors; a folder holding ``config.json`` -> hf; a folder holding ``backbone.safetensors``
    (a pretraining or distillation run, a safetensors export) -> that file; any other folder is
    refused; else official (Meta's released ``.pth``). A training dump, also a ``.pth``, is never
    guessed: it is named (source ``training``)."""
    if uri.endswith(".safetensors"):
        return uri, "safetensors"
    if storage.exists(join_uri(uri, "config.json")):
        return uri, "hf"
    if storage.exists(join_uri(uri, BACKBONE_FILE)):
        return join_uri(uri, BACKBONE_FILE), "safetensors"
    if storage.list(uri):
        raise ValueError(f"{uri} is a folder without {BACKBONE_FILE} (a pretraining or distillation run) or "
                         "config.json (a Hugging Face folder): give the weight file itself")
    return uri, "official"


# the architecture arguments a weight file's tensors fix, and the recipe setting of each
_RECIPE_SETTINGS = {"patch_size": "model.patch_size", "embed_dim": "model.embed_dim", "depth": "model.depth",
                    "ffn_layer": "model.ffn_layer", "num_register_tokens": "model.num_register_tokens"}


def init_backbone(backbone: DinoVisionTransformer, uri: str, source: Source, storage: Storage,
                  dump: Mapping[str, Any] | None = None) -> None:
    """Start a recipe's ``backbone`` from the weights at ``uri``, e.g. Meta's released ones, to
    pretrain or distil further on other data.

    The recipe's position table is sized for its global crop (16 x 16 patches at 224 px) and the
    released one for 518 px (37 x 37): a table of another grid is resized as the weights' own model
    resizes it for an image of the backbone's size (:func:`~trainer.models.vit.resize_positions`,
    with the weights' interpolation settings), so at that size the backbone computes exactly what
    the released model does. Architectures that differ otherwise fail with a ``ValueError`` naming
    each recipe setting (``model.*``) and the value the weights need. ``dump``: :func:`read_weights`'."""
    state_dict, found = read_weights(uri, source, storage, dump)
    theirs = found or infer_arch_kwargs(state_dict)
    ours = backbone.arch_kwargs
    differ = [f"{setting} = {ours[key]!r} (the weights: {theirs[key]!r})"
              for key, setting in _RECIPE_SETTINGS.items() if key in theirs and theirs[key] != ours[key]]
    if differ:
        raise ValueError(f"init weights {uri} do not fit the recipe's backbone: {'; '.join(differ)}; "
                         "set these (or model.arch) to the weights' values")
    load_strict(backbone, with_positions_for(backbone, state_dict, theirs))


def with_positions_for(backbone: DinoVisionTransformer, state_dict: dict[str, Tensor],
                       theirs: dict[str, Any]) -> dict[str, Tensor]:
    """``state_dict`` (of weights built with the arguments ``theirs``) with its position table
    resized to ``backbone``'s grid as the weights' own model resizes it for an image of that size
    (their interpolation settings), so at the backbone's size it computes what they do."""
    table = state_dict.get("pos_embed")
    if not (isinstance(table, Tensor) and table.ndim == 3 and table.shape != backbone.pos_embed.shape):
        return state_dict
    grid = backbone.arch_kwargs["img_size"] // backbone.arch_kwargs["patch_size"]
    resized = resize_positions(table, grid, grid, theirs.get("interpolate_offset", 0.1),
                               theirs.get("interpolate_antialias", False))
    return {**state_dict, "pos_embed": resized.to(table.dtype)}


def load_backbone(
    uri: str, source: Source, storage: Storage | None = None, arch_kwargs: dict[str, Any] | None = None,
    dump: Mapping[str, Any] | None = None,
) -> DinoVisionTransformer:
    """Build and load a backbone; the architecture comes from ``arch_kwargs``, else the file's
    metadata or config, else the tensor shapes (official family). ``dump``: :func:`read_weights`'."""
    state_dict, found = read_weights(uri, source, storage or Storage(), dump)
    model = DinoVisionTransformer(**(arch_kwargs or found or infer_arch_kwargs(state_dict)))
    load_strict(model, state_dict)
    return model.eval()


def save_backbone(model: DinoVisionTransformer, uri: str, storage: Storage | None = None) -> None:
    """Write a backbone as safetensors (architecture in the metadata), atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save_safetensors_bytes(tensors, metadata={ARCH_METADATA_KEY: json.dumps(model.arch_kwargs)})
    (storage or Storage()).write_bytes(uri, data)
