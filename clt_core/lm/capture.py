"""Where a language model's MLP inputs and outputs are read, and reading them.

`capture_points` picks the per-architecture MLP input/output modules (`PRESETS`, or custom `{layer}` templates) and
checks them against the model before any batch runs. `NNsightCapture` reads them all in one nnsight trace that stops
after the last one (extraction's capture); `capture_with_hooks` reads them with plain PyTorch hooks and is the ground
truth the nnsight path is tested against. `traced` and `module_at` are the nnsight helpers that the spliced-in
evaluation uses as well.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from clt_core.errors import ModelError

CaptureKind = Literal["input", "output"]


# --------------------------------------------------------------------------------------------------------------------
# Capture points


@dataclass(frozen=True)
class CapturePoints:
    """Which module's input or output is the CLT input and target at each layer; templates contain `{layer}`."""

    input_template: str
    output_template: str
    input_kind: CaptureKind = "input"
    output_kind: CaptureKind = "output"
    num_layers: int = 0

    def input_name(self, layer: int) -> str:
        return self.input_template.format(layer=layer)

    def output_name(self, layer: int) -> str:
        return self.output_template.format(layer=layer)

    def as_dict(self) -> dict[str, str]:
        """For the store's metadata."""
        return {
            "input_template": self.input_template,
            "input_kind": self.input_kind,
            "output_template": self.output_template,
            "output_kind": self.output_kind,
        }


Preset = tuple[str, CaptureKind, str, CaptureKind]
"""`(input template, input kind, output template, output kind)`."""

_LAYERS_MLP: Preset = ("model.layers.{layer}.mlp", "input", "model.layers.{layer}.mlp", "output")
# Gemma 2/3 normalise the MLP output (post_feedforward_layernorm) before adding it to the residual stream. The target is
# that normalised output: it is what the MLP block writes to the residual (TransformerLens' `hook_mlp_out`, used by
# Gemma Scope and circuit-tracer transcoders), so splicing the CLT in replaces the MLP *and* its output norm.
_GEMMA2: Preset = ("model.layers.{layer}.mlp", "input", "model.layers.{layer}.post_feedforward_layernorm", "output")

PRESETS: dict[str, Preset] = {
    "llama": _LAYERS_MLP,  # SmolLM and SmolLM2 are llama
    "mistral": _LAYERS_MLP,
    "qwen2": _LAYERS_MLP,
    "qwen3": _LAYERS_MLP,
    "smollm3": _LAYERS_MLP,
    "gemma": _LAYERS_MLP,
    "phi3": _LAYERS_MLP,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    # GPT-2: c_fc's input is ln_2's output (= the MLP input) and c_proj's output is the MLP output (dropout is identity
    # in eval mode), as circuit-tracer names them.
    "gpt2": ("transformer.h.{layer}.mlp.c_fc", "input", "transformer.h.{layer}.mlp.c_proj", "output"),
    "gpt_neox": ("gpt_neox.layers.{layer}.mlp", "input", "gpt_neox.layers.{layer}.mlp", "output"),
}

_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "fc", "dense")


def capture_points(
    model: nn.Module,
    input_template: str | None = None,
    output_template: str | None = None,
    *,
    input_kind: CaptureKind | None = None,
    output_kind: CaptureKind | None = None,
) -> CapturePoints:
    """The preset for the model's architecture, overridden by any template given, validated for every layer.

    A template that names no module fails here, before a batch runs, listing the module names the user probably meant.
    """
    config: Any = model.config  # a transformers PretrainedConfig (nn.Module types its attributes Tensor | Module)
    model_type = config.model_type
    preset = PRESETS.get(model_type)
    if preset is None:
        if input_template is None or output_template is None:
            raise ModelError(
                f"no capture preset for architecture '{model_type}' (presets: {', '.join(sorted(PRESETS))}); give "
                f"--input-template and --output-template, e.g. for layer 0 one of: {_candidates(model, 0, '')}"
            )
        custom: Preset = (input_template, "input", output_template, "output")
        preset = custom
    in_t, in_k, out_t, out_k = preset
    points = CapturePoints(
        input_template=input_template or in_t,
        output_template=output_template or out_t,
        input_kind=input_kind or (in_k if input_template is None else "input"),
        output_kind=output_kind or (out_k if output_template is None else "output"),
        num_layers=int(config.get_text_config().num_hidden_layers),
    )
    validate_capture_points(model, points)
    return points


def validate_capture_points(model: nn.Module, points: CapturePoints) -> None:
    """Every layer's input and output module exists (names only: nothing runs)."""
    if points.num_layers < 1:
        raise ModelError(f"capture points need the model's layer count, got num_layers={points.num_layers}")
    names = dict(model.named_modules(remove_duplicate=False))
    for role, template, kind in (
        ("input", points.input_template, points.input_kind),
        ("output", points.output_template, points.output_kind),
    ):
        if kind not in ("input", "output"):
            raise ModelError(f"capture {role} kind must be 'input' or 'output', got {kind!r}")
        if "{layer}" not in template:
            raise ModelError(f"capture {role} template {template!r} must contain '{{layer}}'")
        for layer in range(points.num_layers):
            try:
                name = template.format(layer=layer)
            except (KeyError, IndexError, ValueError) as err:
                raise ModelError(
                    f"capture {role} template {template!r} is malformed ({err!r}); only {{layer}} may be substituted"
                ) from None
            if name not in names:
                raise ModelError(
                    f"capture {role} template {template!r}: no module '{name}' in {type(model).__name__} "
                    f"({points.num_layers} layers); candidates for layer {layer}: {_candidates(model, layer, name)}"
                )


def _candidates(model: nn.Module, layer: int, wanted: str, limit: int = 25) -> str:
    """Module names of `layer` that look like MLP parts, plus close spellings of `wanted`."""
    all_names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    marker = f".{layer}."
    in_layer = [n for n in all_names if marker in n + "."]
    found = [n for n in in_layer if any(w in n.rsplit(marker, 1)[-1].lower() for w in _MLP_WORDS)]
    if wanted:
        found += [n for n in difflib.get_close_matches(wanted, all_names, n=5, cutoff=0.6) if n not in found]
    if not found:
        found = in_layer
    shown = ", ".join(found[:limit]) or "(none)"
    return shown + (f", … ({len(found) - limit} more)" if len(found) > limit else "")


# --------------------------------------------------------------------------------------------------------------------
# Reference capture with plain hooks


class _StopForward(Exception):
    """Raised from a hook once everything is captured, to skip the rest of the forward (the LM head)."""


def capture_with_hooks(
    model: nn.Module,
    points: CapturePoints,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    stop_early: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets `[B, T, L, d]` read with PyTorch forward hooks: the reference for the nnsight capture.

    A module's input is its first positional argument (or first keyword argument); a tuple output gives its first
    element. Values are cloned when read, so in-place changes later in the forward cannot alter them. With
    `stop_early` the forward is abandoned once every value is read (skipping the LM head); without it, a point that
    runs more than once per forward is also detected.
    """
    n = points.num_layers
    modules = dict(model.named_modules(remove_duplicate=False))
    wanted: list[tuple[str, int, str, CaptureKind]] = []
    for layer in range(n):
        wanted.append(("inputs", layer, points.input_name(layer), points.input_kind))
        wanted.append(("targets", layer, points.output_name(layer), points.output_kind))
    got: dict[tuple[str, int], list[torch.Tensor]] = {(role, layer): [] for role, layer, _, _ in wanted}

    def record(key: tuple[str, int], value: Any) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"capture point {key} gave a {type(value).__name__}, not a tensor")
        got[key].append(value.detach().clone())
        if stop_early and all(got.values()):
            raise _StopForward

    handles = []
    try:
        for role, layer, name, kind in wanted:
            module, key = modules[name], (role, layer)
            if kind == "input":

                def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, key: tuple[str, int] = key) -> None:
                    record(key, args[0] if args else next(iter(kwargs.values()), None))

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def hook(_m: nn.Module, _args: tuple, output: Any, key: tuple[str, int] = key) -> None:
                    record(key, output)

                handles.append(module.register_forward_hook(hook))
        with torch.no_grad(), contextlib.suppress(_StopForward):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    for (role, layer), values in got.items():
        if len(values) != 1:
            name = points.input_name(layer) if role == "inputs" else points.output_name(layer)
            raise ModelError(f"capture point '{name}' ran {len(values)} times in one forward pass; expected once")
    inputs = torch.stack([got[("inputs", layer)][0] for layer in range(n)], dim=2)
    targets = torch.stack([got[("targets", layer)][0] for layer in range(n)], dim=2)
    return inputs, targets


# --------------------------------------------------------------------------------------------------------------------
# Capture through nnsight


def traced(model: torch.nn.Module) -> Any:
    """`nnsight.NNsight(model)`, with nnsight's `.save()` on every Python object taken off again: nnsight mounts it
    on `object` through a C extension when imported, and packages imported afterwards that walk `object.__dict__`
    then fail (beartype, which Prefect imports lazily: "unhashable type: 'instancemethod'"). Use `nnsight.save(x)`."""
    from nnsight import NNsight
    from nnsight._c import unmount

    if unmount is not None and "save" in object.__dict__:
        unmount("save")
    return NNsight(model)


def module_at(root: Any, name: str) -> Any:
    """The submodule `name` ("model.layers.3.mlp") of a module or of an nnsight envoy wrapping one."""
    node = root
    for part in name.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


class NNsightCapture:
    """Reads every layer's MLP input and output in one traced forward that stops after the last of them."""

    def __init__(self, model: torch.nn.Module, points: CapturePoints) -> None:
        self.traced = traced(model)
        self.points = points

    def _module(self, name: str) -> Any:
        return module_at(self.traced, name)

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T]` token ids -> inputs and targets `[B, T, L, d]`."""
        points = self.points
        saved: list[Any] = []
        from nnsight import save

        with torch.inference_mode(), self.traced.trace(input_ids) as tracer:
            for layer in range(points.num_layers):
                source = self._module(points.input_name(layer))
                sink = self._module(points.output_name(layer))
                saved.append(save(getattr(source, points.input_kind)))
                saved.append(save(getattr(sink, points.output_kind)))
            tracer.stop()
        inputs = torch.stack([_tensor(t) for t in saved[0::2]], dim=2)
        targets = torch.stack([_tensor(t) for t in saved[1::2]], dim=2)
        return inputs, targets


def _tensor(value: Any) -> torch.Tensor:
    """A module's input is saved as its first positional argument; some outputs are tuples."""
    while isinstance(value, tuple | list):
        value = value[0]
    return value
