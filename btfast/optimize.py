"""`optimize(model)`: a drop-in module that runs a BridgeTower head through btfast's own forward."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput
from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerContrastiveOutput, BridgeTowerModelOutput

from btfast import inputs
from btfast.errors import InputError
from btfast.kernel_race import Workload, race
from btfast.model import BridgeTower, Layers, itc_embedding, itc_loss
from btfast.ops import Ops
from btfast.runtime import Arg, Buckets, Runtime, as_buckets
from btfast.spec import ModelSpec, read_spec
from btfast.states import FusionOutput, ImageStates, TextStates
from btfast.weights import Weights, pack

log = logging.getLogger("btfast")


class OptimizedBridgeTower(nn.Module):
    """A BridgeTower head with btfast's forward: same arguments, same output class, same numbers.

    The wrapped model stays available as `.model` and still works; its q/k/v parameters become views
    into packed tensors (no copy). `encode_text` / `encode_image` / `fuse` expose the three stages, so
    each unique text or image can be encoded once and fused with many partners. `OptimizedBridgeTower(model)`
    builds the subclass of the model's head, whose forward has the reference's signature.
    """

    def __new__(cls, model: nn.Module, *args: Any, **kwargs: Any) -> OptimizedBridgeTower:
        if cls is OptimizedBridgeTower:
            cls = _OPTIMIZED[read_spec(model).head]
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        kernels: bool | str | Iterable[str] | None = None,
        buckets: Buckets | dict | None = None,
        compile: bool | str | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        super().__init__()
        self.spec: ModelSpec = read_spec(model)
        self.model = model.eval()
        self.ops = Ops(kernels)
        self._warned: set[str] = set()
        self._runtime_options = (as_buckets(buckets), compile, cuda_graphs)
        self.weights: Weights = pack(model, self.spec)
        self.runtimes: dict[str, Runtime] = self._make_runtimes()

    def _apply(self, fn: Any, recurse: bool = True) -> OptimizedBridgeTower:
        # .to() / .cuda() / .half() give the model new parameter tensors: pack them again, and start a
        # fresh runtime (compiled code and graphs hold the old tensors).
        super()._apply(fn, recurse)
        self.weights = pack(self.model, self.spec)
        self.runtimes = self._make_runtimes()
        return self

    @property
    def runtime(self) -> Runtime:
        """The runtime of the whole-model forward (`runtimes` also holds the text / image / fuse stages')."""
        return self.runtimes["forward"]

    def _make_runtimes(self) -> dict[str, Runtime]:
        buckets, compile, cuda_graphs = self._runtime_options
        on_cuda = self.device.type == "cuda"
        if on_cuda or (self.ops.interpret and self.ops.explicit):
            self.ops.self_check(self.device, self.dtype, self.spec.hidden, self.spec.text_heads)
        # Off CUDA, torch.compile measured slower than eager for bridgetower-base and costs minutes to build
        # (bench/results/2026-11-27-cpu-compile-check.json), so it is off unless asked for; graphs need CUDA.
        compile = on_cuda if compile is None else compile
        graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if graphs and not on_cuda:
            self._warn_once("graphs-off-cuda", "btfast: cuda_graphs=True ignored: the model is not on CUDA")
            graphs = False
        if on_cuda and not self.ops.explicit:  # the default set: each kernel serves only where it beats torch
            self.ops.take(race(self.ops, Workload.of(self.spec), self.device, self.dtype, compile, graphs))
        # The forward with every layer type compiled once (dynamic batch and text length), and the same forward
        # eager: what serves if compiling fails, and where kernels may serve, the op table keeps its books in it.
        eager = BridgeTower(self.weights, self.ops, self.spec)
        backend = "inductor" if compile is True else compile
        fast = BridgeTower(self.weights, self.ops, self.spec, Layers.compiled(backend)) if compile else eager
        # Each stage, how its inputs are padded and where its outputs hold the text length.
        ids, mask, pixels = Arg(self.spec.pad_id, 1), Arg(False, 1), Arg(0.0)
        heads_out = {"base": (1, None, None), "itm": (None,), "mlm": (1,), "itc": (None, None, None)}
        plan = {
            "forward": (BridgeTower.forward, (ids, mask, pixels), heads_out[self.spec.head]),
            "text": (_text_stage, (ids, mask), (2, None)),
            "image": (_image_stage, (pixels,), (None,)),
            "fuse": (BridgeTower.fuse, (Arg(0.0, 2), mask, Arg(0.0)), (1, None, None)),
        }
        return {
            name: Runtime(
                partial(fn, fast), ins, outs, buckets, compile, graphs, name, partial(fn, eager), self.ops.may_serve
            )
            for name, (fn, ins, outs) in plan.items()
        }

    def warmup(
        self,
        batch_sizes: tuple[int, ...] = (1, 8, 32, 128),
        text_lengths: tuple[int, ...] = (16, 40, 64),
        stages: tuple[str, ...] = ("forward",),
    ) -> dict[str, dict[tuple[int, int], float]]:
        """Compile (and on CUDA capture) the buckets covering these sizes ahead of time, for the whole forward
        and/or the stages ("text", "image", "fuse") offline scoring uses; returns seconds per bucket built.
        Calls inside these buckets then never compile again."""
        c, s = self.spec.cross_layers, self.spec.image_size
        dev, dt = self.device, self.dtype
        ids = torch.full((1, 1), self.spec.pad_id + 1, dtype=torch.long, device=dev)
        mask = torch.ones(1, 1, dtype=torch.bool, device=dev)
        pixels = torch.zeros(1, 3, s, s, dtype=dt, device=dev)
        like = {
            "forward": (ids, mask, pixels),
            "text": (ids, mask),
            "image": (pixels,),
            "fuse": (
                torch.zeros(1, c, 1, self.spec.hidden, dtype=dt, device=dev),
                mask,
                torch.zeros(1, c, self.spec.image_tokens, self.spec.hidden, dtype=dt, device=dev),
            ),
        }
        unknown = set(stages) - set(like)
        if unknown:
            raise InputError(f"unknown stages {sorted(unknown)}; choose from {sorted(like)}")
        costs = {}
        with torch.no_grad():
            for stage in stages:
                costs[stage] = self.runtimes[stage].warmup(batch_sizes, text_lengths, like[stage])
        built = sum(len(v) for v in costs.values())
        if built:
            log.info("btfast warmup: built %d buckets in %.1fs", built, sum(sum(v.values()) for v in costs.values()))
        return costs

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.weights.word.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.word.dtype

    # -- stages -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TextStates:
        """Run the text tower on (B, L) token ids; right padding must use the pad id (as the reference)."""
        inputs.check_text(self.spec, self.weights.word.shape[0], input_ids, attention_mask)
        ids, key_mask = input_ids.to(self.device), _key_mask(attention_mask, self.device)
        runtime = self.runtimes["text"]
        bridges, cls = runtime(ids, _mask_for(runtime, key_mask, ids))
        return TextStates(bridges, key_mask, cls)

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor) -> ImageStates:
        """Run the vision tower on (B, 3, S, S) normalised pixels."""
        inputs.check_image(self.spec, pixel_values)
        (bridges,) = self.runtimes["image"](pixel_values.to(self.device, self.dtype))
        return ImageStates(bridges)

    @torch.no_grad()
    def fuse(self, text_states: TextStates, image_states: ImageStates) -> FusionOutput:
        """Fuse text i with image i (equal lengths; use `.index()` to pair rows many-to-many)."""
        if len(text_states) != len(image_states):
            raise InputError(f"fuse pairs rows: {len(text_states)} texts but {len(image_states)} images")
        runtime = self.runtimes["fuse"]
        mask = _mask_for(runtime, text_states.key_mask, text_states.bridges[:, 0, :, 0])
        return FusionOutput(*runtime(text_states.bridges, mask, image_states.bridges))

    # -- head-level helpers for scoring ---------------------------------------------------------------

    def _need_head(self, head: str, what: str) -> None:
        if self.spec.head != head:
            raise InputError(f"{what} needs a {_HEAD_CLASS[head]} model; this one is {_HEAD_CLASS[self.spec.head]}")

    @torch.no_grad()
    def itm_logits(self, text_states: TextStates, image_states: ImageStates) -> Tensor:
        """(B, 2) image-text matching logits of row-wise pairs; logit 1 is 'match'."""
        self._need_head("itm", "itm_logits")
        return self.ops.linear(self.fuse(text_states, image_states).pooler_output, self.weights.itm)

    @torch.no_grad()
    def itc_embeddings(
        self, text: TextStates | None = None, image: ImageStates | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Normalised unimodal ITC embeddings (text, image): no fusion needed, the first stage of retrieval."""
        self._need_head("itc", "itc_embeddings")
        w, ops = self.weights, self.ops
        t = None if text is None else itc_embedding(ops, text.cls, w.itc_text)
        v = None if image is None else itc_embedding(ops, image.bridges[:, -1, 0], w.itc_image)
        return t, v

    @torch.no_grad()
    def cross_embeddings(self, text_states: TextStates, image_states: ImageStates) -> Tensor:
        """Normalised ITC embedding of the fused pair (row-wise)."""
        self._need_head("itc", "cross_embeddings")
        pooled = self.fuse(text_states, image_states).pooler_output
        return itc_embedding(self.ops, pooled, self.weights.itc_cross)

    # -- the drop-in forward --------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _call(self, named: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        """The forward of every head: `named` holds the head's named arguments (its own signature, as the
        reference's), `kwargs` the rest. Requests btfast does not compute go to the reference model whole."""
        why = self._reference_reasons(named, kwargs)
        if why:
            self._warn_once(
                "reference:" + ",".join(why),
                f"btfast: {', '.join(why)} requested: served by the transformers reference model (slow path)",
            )
            return self.model(**named, **kwargs)
        if named.get("inputs_embeds") is not None:
            raise InputError("inputs_embeds is not supported (nor by the reference): pass input_ids")
        unknown = set(kwargs) - {"output_attentions", "output_hidden_states", "return_dict", "use_cache"}
        if unknown:
            raise InputError(f"unexpected arguments: {', '.join(sorted(unknown))}")
        input_ids, attention_mask, pixel_values = named["input_ids"], named["attention_mask"], named["pixel_values"]
        inputs.check_text(self.spec, self.weights.word.shape[0], input_ids, attention_mask)
        inputs.check_image(self.spec, pixel_values)
        inputs.check_pair(input_ids, pixel_values)
        out = self.run(
            input_ids.to(self.device),
            _key_mask(attention_mask, self.device),
            pixel_values.to(self.device, self.dtype),
            named.get("labels") if self.spec.head in ("itm", "mlm") else None,
            bool(named.get("return_loss")),
        )
        return out if self._flag(kwargs, "return_dict") else out.to_tuple()

    def _flag(self, kwargs: dict[str, Any], name: str) -> bool:
        """An output flag as transformers reads it: the keyword when given (not None), else the config's value."""
        value = kwargs.get(name)
        return bool(getattr(self.model.config, name, name == "return_dict") if value is None else value)

    def _reference_reasons(self, named: dict[str, Any], kwargs: dict[str, Any]) -> list[str]:
        """What in this call only the reference model serves (keyword or config flag), named for the warning."""
        why = [
            name if kwargs.get(name) is not None else f"config.{name}"
            for name in ("output_hidden_states", "output_attentions")
            if self._flag(kwargs, name)
        ]
        if named.get("image_embeds") is not None:
            why.append("image_embeds")
        if named.get("interpolate_pos_encoding"):
            why.append("interpolate_pos_encoding")
        if named.get("image_token_type_idx") not in (None, 0, 1):  # the reference reads 0 as 1 (`idx or 1`)
            why.append("image_token_type_idx")
        return why

    def run(
        self, input_ids: Tensor, key_mask: Tensor | None, pixel_values: Tensor, labels: Tensor | None, return_loss: bool
    ) -> Any:
        """The whole forward on checked, on-device inputs (through the runtime); returns the HF output class."""
        raw = self.runtime(input_ids, _mask_for(self.runtime, key_mask, input_ids), pixel_values)
        head = self.spec.head
        if head == "base":
            t, v, pooled = raw
            return BridgeTowerModelOutput(text_features=t, image_features=v, pooler_output=pooled)
        if head == "itm":
            (logits,) = raw
            loss = None if labels is None else F.cross_entropy(logits, labels.to(logits.device))
            return SequenceClassifierOutput(loss=loss, logits=logits)
        if head == "mlm":
            (logits,) = raw
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.to(logits.device).view(-1))
            return MaskedLMOutput(loss=loss, logits=logits)
        t, v, c = raw
        loss = itc_loss(t, v, c, self.weights.logit_scale) if return_loss else None
        return BridgeTowerContrastiveOutput(
            loss=loss, logits=torch.stack([t, v, c], dim=-2), text_embeds=t, image_embeds=v, cross_embeds=c
        )

    # -- introspection -------------------------------------------------------------------------------

    def explain(self) -> str:
        """What btfast runs for this model: shapes, dtype, device, backends and every fallback with its reason."""
        s = self.spec
        lines = [
            f"btfast: {_HEAD_CLASS[s.head]} on {self.device}, {self.dtype}",
            f"  text {s.text_layers} layers, vision {len(self.weights.vision_blocks)} blocks, "
            f"{s.cross_layers} cross layers (fusion from layer {s.split}), hidden {s.hidden}, "
            f"link '{s.link_type}'{' shared' if s.share_links else ''}, "
            f"transforms {'shared' if s.share_transforms else 'per layer'}",
            f"  image {s.image_size}px / {s.patch_size}px patches = {s.image_tokens} tokens; "
            f"text up to {s.max_text_len} tokens",
        ]
        ops = self.ops.reasons() or ["ops: torch (no call yet)" if self.device.type == "cuda" else "ops: torch"]
        lines += ["  " + line for line in ops]
        b = self.runtime.buckets
        lines.append(f"  buckets: batch {list(b.batch)}, text {list(b.text)}")
        for runtime in self.runtimes.values():
            lines += ["  " + line for line in runtime.describe()]
        if self._warned:
            lines.append("  reference model served: " + ", ".join(sorted(self._warned)))
        return "\n".join(lines)


_HEAD_CLASS = {
    "base": "BridgeTowerModel",
    "itm": "BridgeTowerForImageAndTextRetrieval",
    "mlm": "BridgeTowerForMaskedLM",
    "itc": "BridgeTowerForContrastiveLearning",
}


# One subclass per head, each with its reference's forward signature (names, order, defaults), so positional
# calls mean what they mean to transformers. `token_type_ids` and `pixel_mask` are ignored, as by the reference.


class OptimizedBridgeTowerModel(OptimizedBridgeTower):
    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        pixel_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_token_type_idx: int | None = None,
        labels: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> Any:
        """As BridgeTowerModel.forward (`labels` unused, as there)."""
        return self._call(_named(locals()), kwargs)


class OptimizedBridgeTowerForImageAndTextRetrieval(OptimizedBridgeTower):
    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        pixel_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        image_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """As BridgeTowerForImageAndTextRetrieval.forward."""
        return self._call(_named(locals()), kwargs)


class OptimizedBridgeTowerForMaskedLM(OptimizedBridgeTower):
    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        pixel_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        image_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """As BridgeTowerForMaskedLM.forward."""
        return self._call(_named(locals()), kwargs)


class OptimizedBridgeTowerForContrastiveLearning(OptimizedBridgeTower):
    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        pixel_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        image_embeds: Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """As BridgeTowerForContrastiveLearning.forward."""
        return self._call(_named(locals()), kwargs)


_OPTIMIZED = {
    "base": OptimizedBridgeTowerModel,
    "itm": OptimizedBridgeTowerForImageAndTextRetrieval,
    "mlm": OptimizedBridgeTowerForMaskedLM,
    "itc": OptimizedBridgeTowerForContrastiveLearning,
}


def _text_stage(model: BridgeTower, input_ids: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    ts = model.encode_text(input_ids, key_mask)
    return ts.bridges, ts.cls


def _image_stage(model: BridgeTower, pixel_values: Tensor) -> tuple[Tensor]:
    return (model.encode_image(pixel_values).bridges,)


def _named(values: dict[str, Any]) -> dict[str, Any]:
    """A forward's named arguments from its locals()."""
    return {k: v for k, v in values.items() if k not in ("self", "kwargs")}


def _key_mask(attention_mask: Tensor | None, device: torch.device) -> Tensor | None:
    return None if attention_mask is None else attention_mask.to(device).bool()


def _mask_for(runtime: Runtime, key_mask: Tensor | None, like: Tensor) -> Tensor | None:
    """The key mask a runtime call takes: padded buckets need a real one (all True when none was given)."""
    if key_mask is None and runtime.pads:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return key_mask


def optimize(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    kernels: bool | str | Iterable[str] | None = None,
    buckets: Buckets | dict | None = None,
    compile: bool | str | None = None,
    cuda_graphs: bool | None = None,
) -> OptimizedBridgeTower:
    """Make a transformers BridgeTower model fast; calls return the same outputs as `model(...)`.

    dtype: torch.bfloat16 / torch.float16 run in half precision (LayerNorm, softmax and accumulation
    in fp32); the model's parameters are cast in place, as `model.to(dtype)` would. device: moves the
    model there first. kernels: None = on CUDA, each Triton kernel (add+LayerNorm, GEMM, attention) that
    beats torch when timed at this model's shapes (the kernel race, in explain()); True / "all" = every
    kernel, False = torch only, or a list of op names (served as asked, no race).
    buckets: `btfast.Buckets(batch=..., text=...)` or a dict of the same; calls are padded up to them.
    compile: torch.compile each layer type once, batch and text length dynamic (default: on CUDA only; True =
    inductor, or a backend name or callable).
    cuda_graphs: capture and replay a CUDA graph per bucket (default: on CUDA).
    """
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16; got {dtype}")
    read_spec(model)  # refuse unsupported models before touching them
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    return OptimizedBridgeTower(model, kernels=kernels, buckets=buckets, compile=compile, cuda_graphs=cuda_graphs)


class _CallableModule(types.ModuleType):
    """`btfast.optimize` names this module and its function: importing the module (`from btfast.optimize import
    OptimizedBridgeTower`) makes the package attribute the module, so calling the module optimizes too."""

    def __call__(self, *args: Any, **kwargs: Any) -> OptimizedBridgeTower:
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
