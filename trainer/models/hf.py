"""Converters between our (the official) layout and transformers' DINOv2 models, and HF folders.

Why: an exported folder must load with ``transformers.AutoModel.from_pretrained`` alone, with no
code of ours, as ``Dinov2Model`` (no registers) or ``Dinov2WithRegistersModel``; and folders
from the Hub or from ``save_pretrained`` must load into our model. The converters are pure
(state dict in, state dict out) and strict: a missing or unexpected key fails naming it.

Two HF key layouts exist, and :func:`from_hf_state_dict` reads both:

* ``"module"``: the parameter names of transformers 5's modules (``attention.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``), what ``Dinov2Model().state_dict()`` holds;
* ``"checkpoint"``: the names ``save_pretrained`` writes and the Hub serves, which transformers
  4 and 5 both load (``attention.attention.{query,key,value}``, ``attention.output.dense``,
  ``mlp.weights_in`` / ``mlp.weights_out``). :func:`export_hf` writes this one.

Our fused tensors are row blocks of theirs: ``attn.qkv`` is ``[q; k; v]`` and SwiGLU's ``w12``
is ``[gate; value]`` (``w3(silu(gate) * value)``), i.e. ``[gate_proj; up_proj]``.

What transformers cannot represent, refused by :func:`hf_config` naming the field: attention
output or FFN projections without bias, LayerScale disabled, a non-integer ``mlp_ratio``, and a
position interpolation other than the original's choice. That choice is fixed by the register
count (the HF config has no field for it): register models resize the position table to the
target grid with antialiasing, as ``Dinov2WithRegistersModel`` does, so they agree everywhere;
non-register models scale by ``(n + 0.1) / M``, while ``Dinov2Model`` resizes to the target grid,
so those two agree at the native resolution (``img_size``) only. Loading an HF folder restores
the original's choice. Stochastic depth is a training setting and is exported as 0.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from safetensors.torch import save_file
from torch import Tensor

from trainer.models.vit import DinoVisionTransformer

HfLayout = Literal["module", "checkpoint"]
MODEL_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
LAYER_NORM_EPS = 1e-6  # every LayerNorm of ours


def original_interpolation(num_register_tokens: int) -> tuple[bool, float]:
    """``(interpolate_antialias, interpolate_offset)`` the original uses for this register count."""
    return (True, 0.0) if num_register_tokens > 0 else (False, 0.1)


# -- configs ------------------------------------------------------------------------------------

def hf_config(arch_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` content of a transformers model equal to ours (in eval mode)."""
    kwargs = arch_kwargs
    for field, why in (
        ("proj_bias", "the attention output projection always has a bias"),
        ("ffn_bias", "the FFN projections always have biases"),
        ("layerscale_init", "LayerScale is always present (None/0 disables it here)"),
    ):
        if not kwargs[field]:
            _unrepresentable(field, kwargs[field], why)
    if float(kwargs["mlp_ratio"]) != int(kwargs["mlp_ratio"]):
        _unrepresentable("mlp_ratio", kwargs["mlp_ratio"], "the config field is an integer")
    registers = int(kwargs["num_register_tokens"])
    antialias, offset = original_interpolation(registers)
    if (kwargs["interpolate_antialias"], kwargs["interpolate_offset"]) != (antialias, offset):
        _unrepresentable(
            "interpolate_antialias/interpolate_offset",
            (kwargs["interpolate_antialias"], kwargs["interpolate_offset"]),
            f"the position interpolation is fixed by the register count: {(antialias, offset)}",
        )
    model_type = "dinov2_with_registers" if registers else "dinov2"
    config: dict[str, Any] = {
        "architectures": [MODEL_CLASSES[model_type]],
        "model_type": model_type,
        "hidden_size": int(kwargs["embed_dim"]),
        "num_hidden_layers": int(kwargs["depth"]),
        "num_attention_heads": int(kwargs["num_heads"]),
        "mlp_ratio": int(kwargs["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": int(kwargs["img_size"]),
        "patch_size": int(kwargs["patch_size"]),
        "num_channels": int(kwargs["in_chans"]),
        "qkv_bias": bool(kwargs["qkv_bias"]),
        "layerscale_value": float(kwargs["layerscale_init"]),
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": kwargs["ffn_layer"] == "swiglu",
    }
    if registers:
        config["num_register_tokens"] = registers
    else:
        config["use_mask_token"] = True
    return config


def arch_kwargs_from_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our constructor arguments from an HF ``config.json`` (inverse of :func:`hf_config`)."""
    model_type = config.get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"HF config: model_type {model_type!r} is not one of {', '.join(MODEL_CLASSES)}")
    for field, wanted in (("hidden_act", "gelu"), ("layer_norm_eps", LAYER_NORM_EPS), ("use_mask_token", True)):
        if config.get(field, wanted) != wanted:
            raise ValueError(f"HF config: {field}={config[field]!r} is not supported (only {wanted!r})")
    mlp_ratio = _required(config, "mlp_ratio")
    registers = int(config.get("num_register_tokens", 4)) if model_type == "dinov2_with_registers" else 0
    antialias, offset = original_interpolation(registers)
    return {
        "img_size": _square(config, "image_size"),
        "patch_size": _square(config, "patch_size"),
        "in_chans": int(config.get("num_channels", 3)),
        "embed_dim": int(_required(config, "hidden_size")),
        "depth": int(_required(config, "num_hidden_layers")),
        "num_heads": int(_required(config, "num_attention_heads")),
        "mlp_ratio": float(mlp_ratio),
        "ffn_layer": "swiglu" if config.get("use_swiglu_ffn", False) else "mlp",
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "proj_bias": True,
        "ffn_bias": True,
        "layerscale_init": float(config.get("layerscale_value", 1.0)),
        "drop_path_rate": float(config.get("drop_path_rate", 0.0)),
        "drop_path_uniform": True,  # HF applies one rate to every block
        "num_register_tokens": registers,
        "interpolate_antialias": antialias,
        "interpolate_offset": offset,
    }


def _unrepresentable(field: str, value: object, why: str) -> NoReturn:
    raise ValueError(f"cannot export {field}={value!r} to transformers' DINOv2: {why}")


def _required(config: Mapping[str, Any], field: str) -> Any:
    if field not in config:
        raise ValueError(f"HF config has no {field!r}")
    return config[field]


def _square(config: Mapping[str, Any], field: str) -> int:
    """An int or a square ``[n, n]`` (HF allows rectangles, our model does not)."""
    value = _required(config, field)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"HF config: {field}={value!r} is not square")
        value = value[0]
    return int(value)


# -- state dicts --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    """One of our tensors and the HF tensors it is made of: row blocks (dim 0), in order."""

    ours: str
    module: tuple[str, ...]
    checkpoint: tuple[str, ...]


def _entry(ours: str, module: str | tuple[str, ...], checkpoint: str | tuple[str, ...] | None = None) -> _Entry:
    module = (module,) if isinstance(module, str) else module
    checkpoint = module if checkpoint is None else (checkpoint,) if isinstance(checkpoint, str) else checkpoint
    return _Entry(ours, module, checkpoint)


def _key_plan(arch_kwargs: Mapping[str, Any]) -> list[_Entry]:
    """Every tensor of a model with these arguments, in both HF layouts."""
    plan = [
        _entry("cls_token", "embeddings.cls_token"),
        _entry("mask_token", "embeddings.mask_token"),
        _entry("pos_embed", "embeddings.position_embeddings"),
        _entry("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
        _entry("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ]
    if arch_kwargs["num_register_tokens"]:
        plan.append(_entry("register_tokens", "embeddings.register_tokens"))
    qkv_params = ("weight", "bias") if arch_kwargs["qkv_bias"] else ("weight",)
    for index in range(arch_kwargs["depth"]):
        ours, theirs = f"blocks.{index}.", f"encoder.layer.{index}."
        block = [
            _entry("ls1.gamma", "layer_scale1.lambda1"),
            _entry("ls2.gamma", "layer_scale2.lambda1"),
            *(_entry(f"attn.qkv.{p}", tuple(f"attention.{n}_proj.{p}" for n in "qkv"),
                     tuple(f"attention.attention.{n}.{p}" for n in ("query", "key", "value")))
              for p in qkv_params),
        ]
        for param in ("weight", "bias"):
            block += [
                _entry(f"norm1.{param}", f"norm1.{param}"),
                _entry(f"norm2.{param}", f"norm2.{param}"),
                _entry(f"attn.proj.{param}", f"attention.o_proj.{param}", f"attention.output.dense.{param}"),
            ]
            if arch_kwargs["ffn_layer"] == "swiglu":
                block += [
                    _entry(f"mlp.w12.{param}", (f"mlp.gate_proj.{param}", f"mlp.up_proj.{param}"),
                           f"mlp.weights_in.{param}"),
                    _entry(f"mlp.w3.{param}", f"mlp.down_proj.{param}", f"mlp.weights_out.{param}"),
                ]
            else:
                block += [_entry(f"mlp.fc1.{param}", f"mlp.fc1.{param}"),
                          _entry(f"mlp.fc2.{param}", f"mlp.fc2.{param}")]
        plan += [
            _Entry(ours + e.ours, tuple(theirs + k for k in e.module), tuple(theirs + k for k in e.checkpoint))
            for e in block
        ]
    plan += [_entry("norm.weight", "layernorm.weight"), _entry("norm.bias", "layernorm.bias")]
    return plan


def to_hf_state_dict(
    state_dict: Mapping[str, Tensor], arch_kwargs: Mapping[str, Any], layout: HfLayout = "module"
) -> dict[str, Tensor]:
    """Our state dict in an HF layout (see the module doc); fused tensors are split into copies."""
    hf_config(arch_kwargs)  # refuses what transformers cannot represent
    plan = _key_plan(arch_kwargs)
    _check_keys(set(state_dict), {e.ours for e in plan}, "our state dict")
    converted: dict[str, Tensor] = {}
    for entry in plan:
        names = entry.module if layout == "module" else entry.checkpoint
        tensor = state_dict[entry.ours]
        if len(names) == 1:
            converted[names[0]] = tensor
        else:
            converted.update(zip(names, (part.clone() for part in tensor.chunk(len(names), dim=0))))
    return converted


def from_hf_state_dict(state_dict: Mapping[str, Tensor], arch_kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
    """An HF state dict in either layout, in ours; each tensor must come in exactly one layout."""
    converted: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for entry in _key_plan(arch_kwargs):
        found = [names for names in dict.fromkeys((entry.module, entry.checkpoint))
                 if all(n in state_dict for n in names)]
        if len(found) != 1:
            missing.append(" / ".join(", ".join(names) for names in (entry.module, entry.checkpoint)))
            continue
        names = found[0]
        used.update(names)
        parts = [state_dict[n] for n in names]
        converted[entry.ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected:
        raise ValueError(
            "HF weights do not fit the config"
            + (f"; missing (or in both layouts): {_few(missing)}" if missing else "")
            + (f"; unexpected: {_few(unexpected)}" if unexpected else "")
        )
    return converted


def _check_keys(found: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} does not fit the architecture"
            + (f"; missing: {_few(missing)}" if missing else "")
            + (f"; unexpected: {_few(unexpected)}" if unexpected else "")
        )


def _few(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


# -- folders ------------------------------------------------------------------------------------

def export_hf(model: DinoVisionTransformer, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (checkpoint layout) for ``AutoModel``.

    Both files are written into a fresh folder beside ``out_dir`` that is then renamed to it, so
    a reader never sees half an export. ``out_dir`` may exist only if it is empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder")
    config = hf_config(model.arch_kwargs)
    hf_state = to_hf_state_dict(model.state_dict(), model.arch_kwargs, layout="checkpoint")
    tensors = {k: v.detach().cpu().contiguous() for k, v in hf_state.items()}
    config["dtype"] = str(tensors["embeddings.cls_token"].dtype).removeprefix("torch.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        os.replace(staging, out_dir)  # POSIX: replaces an empty folder, fails on a non-empty one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
