"""Checks on a call's inputs, with errors that name the problem (the reference often fails deep inside)."""

from __future__ import annotations

import torch
from torch import Tensor

from btfast.errors import InputError
from btfast.spec import ModelSpec


def check_text(spec: ModelSpec, vocab_size: int, input_ids: Tensor | None, attention_mask: Tensor | None) -> None:
    """Shape, dtype and id range of a call's text, checked where the ids are, before they move to the model's
    device: the tokenizer's CPU tensor costs no device sync; ids already on a device are checked there
    asynchronously (no host sync per call)."""
    if input_ids is None:
        raise InputError("input_ids is required (btfast, like the reference, does not take inputs_embeds)")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be int64 or int32 token ids; got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if input_ids.shape[1] > spec.max_text_len:  # reads values (a sync on a device) only past the table
        longest = int(input_ids.ne(spec.pad_id).sum(dim=1).max())
        if longest > spec.max_text_len:
            raise InputError(
                f"text of {longest} tokens is longer than the model's position table allows "
                f"({spec.max_positions} positions = at most {spec.max_text_len} tokens); truncate it "
                f"(e.g. tokenizer(..., truncation=True, max_length={spec.max_text_len}))"
            )

    if input_ids.device.type != "cpu":
        # On the device: no host sync per call (reading a device value back would cost one). A bad id fails
        # asynchronously, at the next sync; pass the tokenizer's CPU tensor to get the error below, at once.
        in_range = ((input_ids >= 0) & (input_ids < vocab_size)).all()
        torch._assert_async(in_range, f"btfast: input_ids must be in [0, {vocab_size})")
        return
    lo, hi = torch.aminmax(input_ids)
    if int(lo) < 0 or int(hi) >= vocab_size:
        raise InputError(f"input_ids must be in [0, {vocab_size}); got values in [{int(lo)}, {int(hi)}]")


def check_image(spec: ModelSpec, pixel_values: Tensor | None) -> None:
    if pixel_values is None:
        raise InputError("pixel_values is required")
    want = (3, spec.image_size, spec.image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
        raise InputError(
            f"pixel_values must be (batch, {want[0]}, {want[1]}, {want[2]}) for this model "
            f"(vision_config.image_size={spec.image_size}); got shape {tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise InputError(f"pixel_values must be a float tensor (normalised pixels); got {pixel_values.dtype}")


def check_pair(input_ids: Tensor, pixel_values: Tensor) -> None:
    if input_ids.shape[0] != pixel_values.shape[0]:
        raise InputError(
            f"text batch ({input_ids.shape[0]}) and image batch ({pixel_values.shape[0]}) differ: "
            "BridgeTower scores row i of input_ids with image i"
        )
