"""What the towers hand to fusion: per-text and per-image states, encoded once and fused with many partners."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TextStates:
    """The text tower's output for B texts.

    bridges: (B, C, L, H), the transform of each of the top C unimodal layers (token type folded in);
    key_mask: (B, L) bool, True where a token is real (None: all real);
    cls: (B, H), the last unimodal layer's first token (input of the ITC text head).
    """

    bridges: Tensor
    key_mask: Tensor | None
    cls: Tensor

    def __len__(self) -> int:
        return self.bridges.shape[0]

    def index(self, idx: Tensor | slice) -> TextStates:
        """The states of rows `idx` (a gather: rows may repeat, as in all-pairs fusion)."""
        mask = None if self.key_mask is None else self.key_mask[idx]
        return TextStates(self.bridges[idx], mask, self.cls[idx])

    @staticmethod
    def concat(parts: list[TextStates]) -> TextStates:
        """Join states of texts encoded in different batches, right-padding to the longest (masked keys)."""
        length = max(p.bridges.shape[2] for p in parts)
        bridges, masks = [], []
        for p in parts:
            b, _, n, _ = p.bridges.shape
            mask = p.key_mask
            if mask is None:
                mask = torch.ones((b, n), dtype=torch.bool, device=p.bridges.device)
            bridges.append(F.pad(p.bridges, (0, 0, 0, length - n)))
            masks.append(F.pad(mask, (0, length - n), value=False))
        return TextStates(torch.cat(bridges), torch.cat(masks), torch.cat([p.cls for p in parts]))


@dataclass
class ImageStates:
    """The vision tower's output for B images: bridges (B, C, N, H), token type folded in.

    `bridges[:, -1, 0]` is also the input of the ITC image head.
    """

    bridges: Tensor

    def __len__(self) -> int:
        return self.bridges.shape[0]

    def index(self, idx: Tensor | slice) -> ImageStates:
        return ImageStates(self.bridges[idx])

    @staticmethod
    def concat(parts: list[ImageStates]) -> ImageStates:
        return ImageStates(torch.cat([p.bridges for p in parts]))


@dataclass
class FusionOutput:
    """The cross-modal encoder's output for B pairs (as BridgeTowerModel's output fields)."""

    text_features: Tensor
    image_features: Tensor
    pooler_output: Tensor
