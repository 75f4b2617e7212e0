"""Tiny BridgeTower model folders, saved and loaded as a user would (`save_pretrained` / `from_pretrained`).

Nothing can be downloaded here, so the tokenizer is a RoBERTa-style byte-level BPE trained with `tokenizers` on
a few sentences (specials <s> <pad> </s> <unk> <mask> = ids 0..4, as RoBERTa), wrapped as `RobertaTokenizerFast`
through a folder (`RobertaTokenizerFast(vocab_file=..., merges_file=...)` silently ignores the files), and the
image processor is a `BridgeTowerImageProcessor` sized to the tiny config's 32 px images.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

VOCAB = 320  # byte-level BPE needs 256 byte tokens + 5 specials; a few merges on top
IMAGE = 32
WORDS = (
    "a photo of the dog cat bird car tree house red green blue small large running sitting on in with "
    "two three man woman child street beach sky water grass field city night day picture image of an old new"
).split()


def sentences(n: int, seed: int = 0, min_words: int = 2, max_words: int = 9) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def save_tokenizer(folder: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sentences(400, seed=1) * 3,
        vocab_size=VOCAB,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    with tempfile.TemporaryDirectory() as raw:
        bpe.save_model(raw)
        tok = RobertaTokenizerFast.from_pretrained(raw, model_max_length=512)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2), tok
    assert len(tok) <= VOCAB
    tok.save_pretrained(str(folder))


def save_model_folder(folder: Path, head: str = "itm", seed: int = 0, backbone_seed: int | None = None) -> Path:
    """A folder holding a tiny random `head` model ("itm" or "itc"), its tokenizer and its processor."""
    from transformers import (
        BridgeTowerForContrastiveLearning,
        BridgeTowerForImageAndTextRetrieval,
        BridgeTowerImageProcessor,
        BridgeTowerProcessor,
        RobertaTokenizerFast,
    )

    from btfast.testing import build, tiny_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cls = {"itm": BridgeTowerForImageAndTextRetrieval, "itc": BridgeTowerForContrastiveLearning}[head]
    model = build(cls, tiny_config(vocab_size=VOCAB, image_size=IMAGE), seed=seed)
    model.save_pretrained(str(folder))
    save_tokenizer(folder)
    tok = RobertaTokenizerFast.from_pretrained(str(folder))
    ip = BridgeTowerImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"shortest_edge": IMAGE})
    BridgeTowerProcessor(ip, tok).save_pretrained(str(folder))
    return folder


# ---- images -----------------------------------------------------------------------------------------------------


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random RGB picture (JPEG-friendly) of w × h."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, rng.uniform(2, 9), w)[None, :, None]
    y = np.linspace(0, rng.uniform(2, 9), h)[:, None, None]
    phase = rng.uniform(0, 6, 3)
    a = 127 + 80 * np.sin(x * rng.uniform(0.5, 1.5, 3) + y * rng.uniform(0.5, 1.5, 3) + phase)
    a = a + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def write_images(root: Path, n: int = 6, seed: int = 0) -> list[str]:
    """n good images of various sizes and formats under root; returns their names (relative paths)."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    sizes = [(64, 48), (48, 64), (40, 40), (100, 30), (33, 90), (120, 80), (50, 50), (70, 36)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        img = photo(w, h, seed + i)
        fmt = ["png", "jpg"][i % 2]
        name = f"img{i:03d}.{fmt}"
        img.save(root / name)
        names.append(name)
    return names


def write_bad_images(root: Path) -> dict[str, str]:
    """Awkward and broken images: name -> what it is. The awkward ones must score; the broken ones must not."""
    root.mkdir(parents=True, exist_ok=True)
    base = photo(60, 40, 99)
    out = {}
    base.convert("L").save(root / "gray.png")
    out["gray.png"] = "grayscale"
    base.convert("CMYK").save(root / "cmyk.jpg")
    out["cmyk.jpg"] = "cmyk"
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 60, dtype=np.uint8), (40, 1))))
    rgba.save(root / "alpha.png")
    out["alpha.png"] = "alpha"
    base.convert("P").save(root / "palette.gif")
    out["palette.gif"] = "palette"
    photo(700, 30, 5).save(root / "banner.png")
    out["banner.png"] = "banner"
    photo(30, 700, 6).save(root / "tall.png")
    out["tall.png"] = "banner"
    photo(3000, 2000, 7).save(root / "huge.jpg", quality=80)
    out["huge.jpg"] = "huge"
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    out["corrupt.jpg"] = "corrupt"
    (root / "notimage.png").write_text("hello, I am text")
    out["notimage.png"] = "corrupt"
    buf = io.BytesIO()
    photo(200, 150, 8).save(buf, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.jpg"] = "truncated"
    buf = io.BytesIO()
    photo(200, 150, 9).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.png"] = "truncated"
    (root / "empty.jpg").write_bytes(b"")
    out["empty.jpg"] = "corrupt"
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
