"""End-to-end benchmark of btfast against transformers: the script form of `btfast bench`, and the case
builders of the pytest-benchmark suite (`test_bench_e2e.py`).

    python bench/bench_e2e.py                      # the main job: base shapes, HF eager vs btfast, one batch
    python bench/bench_e2e.py --quick              # all systems at a few sizes, < 5 min on a 2-core CPU
    python bench/bench_e2e.py --all-pairs 16,16    # + 16 images x 16 texts: pair by pair vs encode once (dedup)
    python bench/bench_e2e.py --preset gpu --out bench/results    # the GPU sweep (bench/gpu.sh runs it)
    python bench/bench_e2e.py --help               # every option

Everything is measured by `btfast.benchmark` (systems, timing, FLOPs, reports); see its modules' docstrings.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import BridgeTowerForImageAndTextRetrieval

from btfast.benchmark import cli, systems
from btfast.testing import build, random_inputs, tiny_config


@dataclass
class Case:
    """One system on one batch: `fn()` runs a forward and returns the ITM logits; `close()` frees the model."""

    name: str
    fn: Callable[[], torch.Tensor]
    close: Callable[[], None]


def forward_case(system: str, batch: int, text_len: int, device: str, config=None) -> Case:
    """A forward of `system` (e.g. "btfast-bf16") on the tiny model (or `config`) at (batch, text_len)."""
    config = config or tiny_config()
    loaded = systems.load(
        systems.parse_system(system), lambda: build(BridgeTowerForImageAndTextRetrieval, config), torch.device(device)
    )
    inputs = loaded.prepare(random_inputs(config, batch=batch, seq_len=text_len))

    def fn() -> torch.Tensor:
        with torch.no_grad():
            return loaded.call(inputs)

    return Case(f"{system}-b{batch}-l{text_len}", fn, loaded.close)


@functools.lru_cache(maxsize=8)
def _tiny_reference(batch: int, text_len: int) -> torch.Tensor:
    config = tiny_config()
    model = build(BridgeTowerForImageAndTextRetrieval, config)
    with torch.no_grad():
        return model(**random_inputs(config, batch=batch, seq_len=text_len)).logits


def reference_logits(batch: int, text_len: int, config=None) -> torch.Tensor:
    """hf-eager-fp32 on CPU: what every case is checked against."""
    if config is None:
        return _tiny_reference(batch, text_len).clone()
    model = build(BridgeTowerForImageAndTextRetrieval, config)
    with torch.no_grad():
        return model(**random_inputs(config, batch=batch, seq_len=text_len)).logits


def all_pairs_case(images: int, texts: int, text_len: int, device: str, dtype: torch.dtype | None = None):
    """btfast's all-pairs scoring of `images` × `texts`: each image and text through its tower once, then fusion of
    every pair (`encode_image`, `encode_text`, `itm_logits` over gathered rows). Returns (fn, inputs, config).
    At real shapes, against HF and btfast pair by pair: `btfast bench --all-pairs N,M` (btfast/benchmark/all_pairs.py).
    """
    import btfast

    config = tiny_config()
    fast = btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, config), dtype=dtype, device=device)
    pix = random_inputs(config, batch=images, seq_len=text_len, seed=1)["pixel_values"].to(device)
    txt = random_inputs(config, batch=texts, seq_len=text_len, seed=2)
    ids, mask = txt["input_ids"].to(device), txt["attention_mask"].to(device)
    image_idx = torch.arange(images, device=device).repeat_interleave(texts)
    text_idx = torch.arange(texts, device=device).repeat(images)

    def fn() -> torch.Tensor:  # (images * texts, 2), image-major
        im, ts = fast.encode_image(pix), fast.encode_text(ids, mask)
        return fast.itm_logits(ts.index(text_idx), im.index(image_idx))

    return (
        fn,
        dict(pixel_values=pix, input_ids=ids, attention_mask=mask, image_idx=image_idx, text_idx=text_idx),
        config,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_e2e.py", description="btfast against transformers: throughput, latency, memory, MFU, accuracy."
    )
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
