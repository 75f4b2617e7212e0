"""What btfast needs to know about a BridgeTower model, read and validated once from its config."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerModel,
)

from btfast.errors import UnsupportedModelError

HEADS: dict[type, str] = {
    BridgeTowerModel: "base",
    BridgeTowerForImageAndTextRetrieval: "itm",
    BridgeTowerForMaskedLM: "mlm",
    BridgeTowerForContrastiveLearning: "itc",
}

# HF activation names -> the names of btfast's fused epilogues (see btfast.kernels.ACTIVATIONS).
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "quick_gelu": "quick_gelu",
}


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and switches of one BridgeTower model; `split` = text layers run before fusion starts."""

    head: str
    hidden: int
    text_layers: int
    cross_layers: int
    text_heads: int
    vision_hidden: int
    vision_heads: int
    image_size: int
    patch_size: int
    max_positions: int
    pad_id: int
    text_act: str
    head_act: str
    link_type: str
    share_transforms: bool
    share_links: bool

    @property
    def split(self) -> int:
        return self.text_layers - self.cross_layers + 1

    @property
    def max_text_len(self) -> int:
        """Longest text (in tokens, specials included) whose positions fit the position table."""
        return self.max_positions - self.pad_id - 1

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def _activation(name: object, where: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{where}={name!r} is not supported by btfast; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]


def read_spec(model: nn.Module) -> ModelSpec:
    """Validate `model` and return its spec, or raise UnsupportedModelError naming the problem."""
    head = next((h for cls, h in HEADS.items() if type(model) is cls), None)
    if head is None:
        names = ", ".join(cls.__name__ for cls in HEADS)
        raise UnsupportedModelError(
            f"btfast.optimize expects a transformers BridgeTower model ({names}); got {type(model).__name__}"
        )
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    problems = []
    if getattr(tc, "is_decoder", False) or getattr(tc, "add_cross_attention", False):
        problems.append("text_config.is_decoder / add_cross_attention (a decoder text tower) is not supported")
    if getattr(vc, "remove_last_layer", False):
        problems.append("vision_config.remove_last_layer=True is not supported (the reference cannot run it either)")
    if vc.num_hidden_layers < tc.num_hidden_layers:
        problems.append(
            f"vision_config.num_hidden_layers ({vc.num_hidden_layers}) < text_config.num_hidden_layers "
            f"({tc.num_hidden_layers}): the bridges need a vision layer for every text layer"
        )
    if not 1 <= cfg.num_hidden_layers <= tc.num_hidden_layers:
        problems.append(f"num_hidden_layers={cfg.num_hidden_layers} cross layers must be in 1..{tc.num_hidden_layers}")
    if tc.hidden_size != cfg.hidden_size:
        problems.append(f"text_config.hidden_size ({tc.hidden_size}) != hidden_size ({cfg.hidden_size})")
    if tc.hidden_size % tc.num_attention_heads:
        problems.append(f"text hidden size {tc.hidden_size} is not a multiple of {tc.num_attention_heads} heads")
    if vc.hidden_size % 64:
        problems.append(f"vision hidden size {vc.hidden_size} is not a multiple of the head dim 64")
    if cfg.link_tower_type not in ("add", "scaled_add", "interpolate"):
        problems.append(f"link_tower_type={cfg.link_tower_type!r} is not one of add, scaled_add, interpolate")
    if head == "itc" and not cfg.share_cross_modal_transformer_layers:
        problems.append(
            "BridgeTowerForContrastiveLearning with share_cross_modal_transformer_layers=False is undefined "
            "(the reference calls the per-layer transform list as one module and crashes)"
        )
    if head == "itc" and vc.hidden_size != cfg.hidden_size:
        problems.append(
            f"BridgeTowerForContrastiveLearning with vision_config.hidden_size ({vc.hidden_size}) != hidden_size "
            f"({cfg.hidden_size}) is undefined (the reference adds a hidden_size token-type embedding to the "
            "vision-sized image features and crashes)"
        )
    image_size, patch_size = vc.image_size, vc.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        problems.append(f"non-square image_size/patch_size ({image_size}, {patch_size}) are not supported")
    try:
        text_act = _activation(tc.hidden_act, "text_config.hidden_act")
        head_act = _activation(cfg.hidden_act, "hidden_act")
    except UnsupportedModelError as e:
        problems.append(str(e))
        text_act = head_act = "gelu"
    if problems:
        raise UnsupportedModelError("cannot optimize this BridgeTower model: " + "; ".join(problems))
    return ModelSpec(
        head=head,
        hidden=cfg.hidden_size,
        text_layers=tc.num_hidden_layers,
        cross_layers=cfg.num_hidden_layers,
        text_heads=tc.num_attention_heads,
        vision_hidden=vc.hidden_size,
        vision_heads=vc.hidden_size // 64,
        image_size=image_size,
        patch_size=patch_size,
        max_positions=tc.max_position_embeddings,
        pad_id=tc.pad_token_id,
        text_act=text_act,
        head_act=head_act,
        link_type=cfg.link_tower_type,
        share_transforms=cfg.share_cross_modal_transformer_layers,
        share_links=cfg.share_link_tower_layers,
    )
