"""``torch.compile`` per transformer block, with an eager fallback and unchanged parameter names.

Why per block: every block of a ViT runs the same code on the same shapes, so one compiled graph
per (train/eval mode, token shapes) serves all of them (dynamo keys its cache by code object and
treats each block's parameters as inputs): compile time is one block's, whatever the depth, and
the losses, masking and heads around the blocks stay eager and easy to change.

Why only ``forward`` is compiled (an instance attribute over the class's), not
``torch.compile(block)`` nor ``nn.Module.compile()``: the first wraps the block in an
``OptimizedModule``, so state-dict keys gain ``_orig_mod.`` and checkpoints, exports and the EMA
would see other names; the second compiles ``_call_impl`` with the block's hooks, which under
``fsdp2`` and ``deepspeed`` gather the block's sharded parameters and are better left eager. Both
keep the names here (``state_dict`` never sees the attribute), and falling back is deleting it.

Static shapes (``dynamic=False``): a step's shapes are fixed by the recipe (batch, crop sizes, the
samples kept by stochastic depth), and the packed-token ``shapes`` argument is a list of Python
ints that dynamo specialises on. Training compiles two graphs (student in train mode, teacher in
eval mode under no_grad), plus one per other shape (an evaluation's batch, the high-resolution
phase); nothing recompiles from step to step. Dynamo's default would turn sizes symbolic after
the first new shape, for no gain here. Past ``torch._dynamo.config.recompile_limit`` graphs per
code object (8), dynamo itself runs further shapes eagerly, with a warning.

Why the backward is lowered when the forward compiles: AOTAutograd compiles the backward lazily,
at the first ``loss.backward()``, where a compiler failure would escape the fallback below;
lowering it at the forward call (``force_non_lazy_backward_lowering``, at compile time only)
makes it fail where the fallback catches it.

CUDA graphs (``mode="reduce-overhead"``, ``model.compile_mode``): on a GPU inductor records each
block's kernels once per call site (cudagraph trees: one graph per block, teacher and student,
forward and backward) and replays them with one launch, which takes the per-kernel launch cost of
the host, the step's bottleneck for small models. A replay overwrites the previous one's outputs,
so every training step starts with ``torch.compiler.cudagraph_mark_step_begin()`` and nothing
keeps a block's output past its step. Parameters are read at fixed addresses: one process only
(the config refuses sharded strategies). On CPU the mode compiles as ``default`` does.

The fallback: any exception from a compiled call (tracing, the backend, a recompile for a new
shape) logs a warning naming it, sends every block compiled together back to eager for good, and
re-runs the call eagerly, so the run goes on (a genuine error then raises from the eager code).

:func:`compile_function` does the same for a plain function (the losses' element-wise tails over
``(rows, prototypes)`` logits, the multi-crop augmentation's pixel stages), by default with torch's
shape handling: a row count that changes from step to step (iBOT's masked patches) makes that
dimension dynamic after the first change, one recompile, instead of one graph per count. The
augmentation's few fixed crop sizes take ``dynamic=False``: one graph per size, each specialised.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

_log = logging.getLogger(__name__)

Backend = str | Callable[..., Any]  # a torch.compile backend: a registered name or a callable


def compile_blocks(blocks: Sequence[nn.Module], backend: Backend = "inductor", mode: str = "default") -> None:
    """Compile each block's ``forward`` in place (all blocks must share one class); on the first
    failure all of ``blocks`` run eagerly from then on (see the module docstring). ``mode``: an
    inductor mode of ``torch.compile`` (``reduce-overhead``: CUDA graphs, see the module docstring)."""
    classes = {type(block) for block in blocks}
    if len(classes) != 1:
        raise ValueError(f"compile_blocks takes blocks of one class, got {sorted(c.__name__ for c in classes)}")
    from torch._inductor import list_mode_options

    if mode not in list_mode_options():
        raise ValueError(f"compile mode {mode!r} is not one of {sorted(list_mode_options())}")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"compile mode {mode!r} is an inductor mode; backend {backend!r} takes only 'default'")
    compiled = torch.compile(classes.pop().forward, dynamic=False, backend=_lowering_backward_too(backend, mode))
    fall_back = _FallBack(list(blocks))
    for block in blocks:
        block.forward = _CompiledForward(block, compiled, fall_back)


def compile_function(function: Callable[..., Any], backend: Backend = "inductor",
                     dynamic: bool | None = None) -> Callable[..., Any]:
    """``function`` compiled, running eagerly from its first failure on (see the module docstring);
    ``compiled_now(result)`` says whether it still runs compiled. ``dynamic``: ``torch.compile``'s
    (None: dynamic after the first change of a shape; False: one graph per shape)."""
    return _CompiledFunction(function, backend, dynamic)


def maybe_compiled(function: Callable[..., Any], compiled: bool) -> Callable[..., Any]:
    """:func:`compile_function` of ``function`` when ``compiled``, else ``function`` itself."""
    return compile_function(function) if compiled else function


def compiled_now(function: Callable[..., Any]) -> bool:
    """Whether ``function`` (from :func:`compile_function`) runs compiled (False if it fell back)."""
    return isinstance(function, _CompiledFunction) and function.compiled is not None


def is_compiled(block: nn.Module) -> bool:
    """Whether ``block`` runs a compiled ``forward`` (False if never compiled or fallen back)."""
    return isinstance(vars(block).get("forward"), _CompiledForward)


@functools.cache
def _lowering_backward_too(backend: Backend, mode: str = "default") -> Callable[..., Any]:
    """``backend``, compiling the backward graph together with the forward one (inductor with the
    options of ``mode``, as ``torch.compile(mode=...)`` sets them). One wrapper per backend and
    mode (cached): dynamo reuses a code object's graphs only for the same backend object, so two
    objects compiling one function (the DINO and iBOT losses' cross-entropy) share graphs."""
    compile_graph = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
    if mode == "default":
        options = {}
    else:
        from torch._inductor import list_mode_options  # inductor's own table of what each mode turns on

        options = {"config_patches": list_mode_options(mode)}

    def compile_forward_and_backward(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            return compile_graph(graph, example_inputs, **options)

    return compile_forward_and_backward


class _FallBack:
    """Sends a group of compiled blocks back to their class's eager ``forward``, once, with a warning."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks = blocks

    def __call__(self, error: Exception) -> None:
        compiled = [block for block in self.blocks if is_compiled(block)]
        if not compiled:
            return
        message = " ".join(str(error).split())[:400]
        _log.warning("torch.compile failed for %d %s blocks (%s: %s); they run eagerly from now on",
                     len(self.blocks), type(self.blocks[0]).__name__, type(error).__name__, message)
        for block in compiled:
            del block.forward


class _CompiledForward:
    """A block's ``forward``: the compiled class function applied to the block, or on failure the
    eager one. It holds the block, not a bound method, so a deep copy calls the copy's weights."""

    def __init__(self, block: nn.Module, compiled: Callable[..., Any], fall_back: _FallBack) -> None:
        self.block, self.compiled, self.fall_back = block, compiled, fall_back

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.compiled(self.block, *args, **kwargs)
        except Exception as error:  # any failure of the compiled path: eager takes over
            self.fall_back(error)
            return self.block.forward(*args, **kwargs)


class _CompiledFunction:
    """A function's compiled version, replaced by the function itself at the first failure."""

    def __init__(self, function: Callable[..., Any], backend: Backend, dynamic: bool | None = None) -> None:
        self.function = function
        self.compiled: Callable[..., Any] | None = torch.compile(function, dynamic=dynamic,
                                                                  backend=_lowering_backward_too(backend))
        functools.update_wrapper(self, function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # any failure of the compiled path: eager takes over
                message = " ".join(str(error).split())[:400]
                _log.warning("torch.compile failed for %s (%s: %s); it runs eagerly from now on",
                             self.function.__name__, type(error).__name__, message)
                self.compiled = None
        return self.function(*args, **kwargs)
