"""BridgeTower's input pipeline, done by btfast: images (decode → RGB → resize → crop → normalise) and texts.

Why our own: without torchvision, `BridgeTowerImageProcessor` falls back to a PIL backend that crops to 288 px
whatever `size` says unless `crop_size` is given, crashes on an explicit `{"height", "width"}` crop size,
refuses every non-RGB mode unless `do_convert_rgb=True`, and raises on banners beyond ~20:1 (a side rounds to
0 px). This module implements the pipeline the processor *intends*, reading its parameters from a model folder's
`preprocessor_config.json`, and gives the processor's tensors bit for bit wherever the processor works
(tests/test_preprocess.py):

1. RGB: transparency (an alpha band, or a palette/`transparency` entry) is composited on white, as HF's
   `convert_to_rgb` does since it learnt to (transformers 5.17 and older drop the alpha band instead: exact mode
   follows the installed release, probed once); every other mode goes through `Image.convert("RGB")`.
2. Resize (bicubic, PIL resample 3, on the uint8 image exactly as HF does) so the shortest edge is `size`,
   the longer side capped at `int(1333 / 800 * size)`, both sides floored to multiples of `size_divisor`
   but never below one step (HF: 0 px and a crash on 30×700 banners; here 32 px).
3. Centre crop to `crop_size`; a side smaller than the crop is padded with black (pixel 0, before
   normalisation, centred: what HF's `center_crop` does). The result is one uint8 canvas per image.
4. Rescale (1/255) and normalise (CLIP mean/std) with a per-channel 256-entry lookup table built with HF's
   own arithmetic (float64 rescale → float32 → (x - mean) / std in float32): exact, and a gather instead of
   three passes over float arrays. The table also runs on the device (`normalize_torch`), so worker
   processes can ship uint8 canvases (4× fewer bytes) and the GPU does the rest.

Speed (opt-in, `exact=False`, CLI `--no-exact`; the default is bit-exact): JPEGs much larger than the
target are decoded with `Image.draft`
(libjpeg's DCT scaling by 1/2, 1/4 or 1/8), keeping at least twice the resize target per side so the bicubic
resize still anti-aliases; and a downscale computes only the centre crop (`resize(box=...)`, one PIL op
instead of resize-then-crop). Draft decoding changes pixels by a few levels (measured: mean 0.4-0.8, max 3-5
of 255 on 1600-4000 px photos); the crop-in-resize by at most 1 level on ~2% of pixels; downscales beyond 6×
(large PNGs) first reduce by an integer factor (`reducing_gap=3`). `exact=True` (the default) gives HF's
tensors bit for bit on every input. (Upscales always resize then crop: there the box
form can differ by more.)

Texts: the model folder's tokenizer, truncated to the model's limit (`max_position_embeddings - 2` tokens:
RoBERTa positions start after the padding index), and each text says whether it was truncated.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from btfast.io.fs import is_url, read_bytes

log = logging.getLogger("btfast")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL's own decompression-bomb error threshold (2 × Image.MAX_IMAGE_PIXELS's default).
DEFAULT_MAX_PIXELS = 2 * 89_478_485


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, corrupt, truncated, too large. The message says which."""


def _edge(value: Any, default: int) -> tuple[int, int]:
    """(height, width) from a processor size entry: an int, {"shortest_edge"}, {"height", "width"}."""
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if value.get("shortest_edge"):
            e = int(value["shortest_edge"])
            return e, e
        if value.get("height") and value.get("width"):
            return int(value["height"]), int(value["width"])
    raise ValueError(f"unsupported size entry {value!r}: want an int, {{'shortest_edge'}} or {{'height', 'width'}}")


@dataclass(frozen=True)
class ImageConfig:
    """The image processor's parameters (the fields of `preprocessor_config.json` that BridgeTower uses)."""

    size: int = 288  # shortest edge after resize
    crop_size: tuple[int, int] = (288, 288)  # (height, width)
    size_divisor: int = 32
    resample: int = 3  # PIL bicubic
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_pad: bool = True

    @property
    def longer(self) -> int:
        """The cap on the longer side after resize, as BridgeTower computes it."""
        return int(1333 / 800 * self.size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageConfig:
        def triple(v: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
            if v is None:
                return default
            if isinstance(v, (int, float)):
                return (float(v),) * 3
            v = tuple(float(x) for x in v)
            if len(v) != 3:
                raise ValueError(f"image_mean/image_std need 3 values (RGB), got {v}")
            return v  # type: ignore[return-value]

        size = _edge(d.get("size"), 288)[0]
        crop = d.get("crop_size")
        return cls(
            size=size,
            crop_size=_edge(crop, 288) if crop is not None else (288, 288),
            size_divisor=int(d.get("size_divisor", 32) or 32),
            resample=int(d.get("resample", 3) if d.get("resample") is not None else 3),
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(d.get("do_center_crop", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=triple(d.get("image_mean"), OPENAI_CLIP_MEAN),
            image_std=triple(d.get("image_std"), OPENAI_CLIP_STD),
            do_pad=bool(d.get("do_pad", True)),
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ImageConfig:
        """Read `preprocessor_config.json` (or the `image_processor` entry of `processor_config.json`)."""
        folder = Path(folder)
        path = folder / "preprocessor_config.json"
        if path.is_file():
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(d.get("image_processor", d))
        path = folder / "processor_config.json"
        if path.is_file():
            d = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(d.get("image_processor"), dict):
                return cls.from_dict(d["image_processor"])
        raise FileNotFoundError(
            f"{folder} has no preprocessor_config.json: save the model's BridgeTowerProcessor "
            "(processor.save_pretrained(folder)) next to its weights"
        )

    @classmethod
    def from_processor(cls, processor: Any) -> ImageConfig:
        """From a transformers `BridgeTowerProcessor` or `BridgeTowerImageProcessor` object."""
        ip = getattr(processor, "image_processor", processor)
        return cls.from_dict(ip.to_dict())


def resize_output_size(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    """(height, width) after BridgeTower's resize; every side at least one `size_divisor` step (banners)."""
    shorter, longer, div = cfg.size, cfg.longer, cfg.size_divisor
    scale = shorter / min(height, width)
    if height < width:
        new_h, new_w = shorter, scale * width
    else:
        new_h, new_w = scale * height, shorter
    if max(new_h, new_w) > longer:
        scale = longer / max(new_h, new_w)
        new_h, new_w = scale * new_h, scale * new_w
    new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
    # HF floors to the divisor and crashes when a side reaches 0 (aspect beyond ~20:1); keep one step.
    return max(div, new_h // div * div), max(div, new_w // div * div)


ORIENTATION = 0x0112  # the EXIF orientation tag


def _open_by_extension(source: Any) -> Image.Image:
    """`Image.open` trying the format the path's extension names first, then every format."""
    if isinstance(source, (str, os.PathLike)):
        Image.init()
        fmt = Image.registered_extensions().get(os.path.splitext(os.fspath(source))[1].lower())
        if fmt is not None:
            try:
                return Image.open(source, formats=[fmt])
            except Image.UnidentifiedImageError:
                pass  # named wrongly (a PNG called .jpg): probe
    return Image.open(source)


def has_alpha(img: Image.Image) -> bool:
    return "A" in img.getbands() or img.info.get("transparency") is not None


@functools.cache
def transparency_on_white() -> bool:
    """Whether the installed transformers' BridgeTower processor composites transparency on white (newer releases)
    or drops the alpha band (5.17 and older), found by running it on one transparent black image."""
    try:
        from transformers.utils import logging as hf_logging

        off = dict(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False, do_pad=False)
        clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its notes on backends are not the user's business here
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from transformers import BridgeTowerImageProcessor

                out = BridgeTowerImageProcessor(do_convert_rgb=True, **off)(clear, return_tensors="np")
        finally:
            hf_logging.set_verbosity(verbosity)
        return float(np.asarray(out["pixel_values"]).max()) > 127
    except Exception as e:  # a release whose processor cannot run this: assume the current behaviour
        log.info("btfast: could not probe transformers' RGBA conversion (%s); compositing on white", e)
        return True


def to_rgb(img: Image.Image, on_white: bool = True) -> Image.Image:
    """RGB as HF's `convert_to_rgb`: transparency composited on white (or, `on_white=False`, the alpha band dropped
    as transformers 5.17 and older do), every other mode converted by PIL. An RGB image with a transparent colour
    (a PNG `tRNS` chunk: `info["transparency"]`) is composited too, as HF does."""
    alpha = has_alpha(img)
    if img.mode == "RGB" and not (alpha and on_white):
        return img
    if alpha and on_white:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _lut(cfg: ImageConfig) -> np.ndarray:
    """(3, 256) float32: the normalised value of each uint8 level per channel, with HF's arithmetic."""
    levels = np.arange(256, dtype=np.uint8)
    if cfg.do_rescale:
        x = (levels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = levels.astype(np.float32)
    x = np.repeat(x[None], 3, axis=0)
    if cfg.do_normalize:
        mean = np.array(cfg.image_mean, dtype=np.float32)[:, None]
        std = np.array(cfg.image_std, dtype=np.float32)[:, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class ImagePreprocessor:
    """Decode, convert, resize, crop and normalise images as BridgeTower's processor intends.

    `exact`: True (default) gives HF's tensors bit for bit; False lets libjpeg decode large JPEGs at 1/2, 1/4
    or 1/8 scale (still ≥ 2× the resize target) and resizes straight to the crop when downscaling.
    `max_pixels`: larger images are refused (checked on the header, before decoding).
    `exif_orientation`: True (default) turns a photo opened from a path or bytes upright by its EXIF orientation
    tag, as transformers' `load_image` (what its pipelines use for a path) does; False keeps the stored pixels.
    A PIL image passed in is used as given, as `BridgeTowerProcessor` does.
    """

    config: ImageConfig = field(default_factory=ImageConfig)
    exact: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    alpha_on_white: bool | None = None  # None: as the installed transformers does (transparency_on_white())
    exif_orientation: bool = True

    def __post_init__(self) -> None:
        if self.alpha_on_white is None:
            self.alpha_on_white = transparency_on_white()
        self.lut = _lut(self.config)
        self._lut_torch: dict[Any, Any] = {}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs: Any) -> ImagePreprocessor:
        return cls(ImageConfig.from_pretrained(folder), **kwargs)

    def __getstate__(self) -> dict[str, Any]:  # picklable for worker processes (no torch tensors)
        return {k: getattr(self, k) for k in ("config", "exact", "max_pixels", "alpha_on_white", "exif_orientation")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.__post_init__()

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(height, width) of every output when the pipeline crops to a fixed size, else None."""
        return self.config.crop_size if self.config.do_center_crop else None

    # ---- decode -------------------------------------------------------------------------------------------
    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the image is resized to (its own size when the config does not resize)."""
        if not self.config.do_resize:
            return height, width
        return resize_output_size(height, width, self.config)

    def open(self, source: str | os.PathLike | bytes | bytearray | memoryview | Any) -> Image.Image:
        """A decoded PIL image from a path, bytes or a binary file object; ImageError with the reason if not.

        A path is opened as the format its extension names first, then by probing every format: which plugin
        claims a file when probing depends on the plugins loaded so far (a long-lived worker has seen other
        formats and may take a valid .ico for TGA).
        """
        try:
            if isinstance(source, str) and is_url(source):  # s3://, gs://, memory://, ...: one GET
                source = io.BytesIO(read_bytes(source))
            if isinstance(source, (bytes, bytearray, memoryview)):
                source = io.BytesIO(bytes(source))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = _open_by_extension(source)
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageError(f"image has no pixels ({w}x{h})")
                if w * h > self.max_pixels:
                    raise ImageError(f"image too large: {w}x{h} = {w * h} pixels > max_pixels={self.max_pixels}")
                if not self.exact and img.format == "JPEG" and self.config.do_resize:
                    th, tw = self.target_size(w, h)
                    # libjpeg picks the largest 1/2^k reduction that keeps the image >= the requested size.
                    img.draft(img.mode, (2 * tw, 2 * th))
                img.load()
                if self.exif_orientation and img.getexif().get(ORIENTATION, 1) != 1:
                    img = ImageOps.exif_transpose(img)
            return img
        except ImageError:
            raise
        except FileNotFoundError as e:
            raise ImageError(f"missing file: {e.filename or source}") from None
        except IsADirectoryError:
            raise ImageError(f"not a file: {source}") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image too large: {e}") from None
        except Image.UnidentifiedImageError:
            raise ImageError("not an image, or a format Pillow cannot read") from None
        except NotImplementedError as e:  # a plugin that knows the format but not this variant (e.g. DDS pixels)
            raise ImageError(f"unsupported image variant: {e or 'not implemented by Pillow'}") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, MemoryError) as e:
            msg = str(e) or type(e).__name__
            if "truncated" in msg:
                raise ImageError(f"truncated image: {msg}") from None
            raise ImageError(f"corrupt image: {msg}") from None

    # ---- per image ----------------------------------------------------------------------------------------
    def canvas(self, img: Image.Image) -> np.ndarray:
        """(H, W, 3) uint8: the image converted, resized, centre-cropped (black padding where it is smaller)."""
        cfg = self.config
        img = to_rgb(img, self.alpha_on_white)
        h, w = img.height, img.width
        if cfg.do_resize:
            th, tw = self.target_size(w, h)
            ch, cw = cfg.crop_size
            if not self.exact and cfg.do_center_crop and ch <= th < h and cw <= tw < w:
                # one op: resample only the centre crop of the resized image (source box in source pixels)
                top, left = (th - ch) // 2, (tw - cw) // 2
                sy, sx = h / th, w / tw
                box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
                return np.asarray(img.resize((cw, ch), resample=cfg.resample, box=box, reducing_gap=3.0))
            if (th, tw) != (h, w):
                gap = None if self.exact else 3.0  # integer pre-reduction only beyond 6x (large PNGs)
                img = img.resize((tw, th), resample=cfg.resample, reducing_gap=gap)
            h, w = th, tw
        arr = np.asarray(img)
        if not cfg.do_center_crop:
            return arr
        ch, cw = cfg.crop_size
        if h >= ch and w >= cw:  # plain crop (HF's `top = (h - ch) // 2`)
            top, left = (h - ch) // 2, (w - cw) // 2
            return np.ascontiguousarray(arr[top : top + ch, left : left + cw])
        # HF pads a side smaller than the crop, centred (ceil of half the gap on top/left), then crops.
        out = np.zeros((ch, cw, 3), dtype=np.uint8)
        nh, nw = max(ch, h), max(cw, w)
        top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)
        top, left = (h - ch) // 2 + top_pad, (w - cw) // 2 + left_pad  # crop window in the padded frame
        # image rows [top_pad, top_pad + h) of the padded frame land at rows [top_pad - top, ...) of the crop
        r0, c0 = top_pad - top, left_pad - left
        src_r0, src_c0 = max(0, -r0), max(0, -c0)
        dst_r0, dst_c0 = max(0, r0), max(0, c0)
        nr = min(h - src_r0, ch - dst_r0)
        nc = min(w - src_c0, cw - dst_c0)
        out[dst_r0 : dst_r0 + nr, dst_c0 : dst_c0 + nc] = arr[src_r0 : src_r0 + nr, src_c0 : src_c0 + nc]
        return out

    def load(self, source: Any) -> np.ndarray:
        """`canvas(open(source))`: the worker-side half of the pipeline. ImageError on a bad image."""
        img = source if isinstance(source, Image.Image) else self.open(source)
        try:
            return self.canvas(img)
        except ImageError:
            raise
        except (OSError, ValueError, MemoryError, NotImplementedError) as e:
            raise ImageError(f"cannot convert image: {e}") from None

    def load_or_reason(self, source: Any) -> np.ndarray | str:
        """`load(source)`, or the reason the image cannot be used: the one loader every job uses, so a bad image
        costs one row, never the run (a decoder bug included)."""
        try:
            return self.load(source)
        except ImageError as e:
            return str(e)
        except Exception as e:
            return f"cannot read image: {type(e).__name__}: {e}"

    # ---- normalise (the device-side or batch half) -------------------------------------------------------
    def normalize(self, canvases: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, 3, H, W) float32 from (N, H, W, 3) uint8 canvases of one size, via the lookup table."""
        batch = np.asarray(canvases) if not isinstance(canvases, np.ndarray) else canvases
        if batch.ndim == 3:
            batch = batch[None]
        n, h, w, _ = batch.shape
        out = np.empty((n, 3, h, w), dtype=np.float32)
        for c in range(3):
            np.take(self.lut[c], batch[..., c], out=out[:, c])
        return out

    def normalize_torch(self, canvases: Any) -> Any:
        """The same on a torch uint8 tensor (N, H, W, 3), on its device: (N, 3, H, W) float32."""
        import torch

        key = canvases.device
        lut = self._lut_torch.get(key)
        if lut is None:
            lut = self._lut_torch[key] = torch.from_numpy(self.lut).to(canvases.device)
        idx = canvases.permute(0, 3, 1, 2).long()  # (N, 3, H, W)
        offs = torch.arange(3, device=canvases.device).view(1, 3, 1, 1) * 256
        return lut.view(-1)[idx + offs]

    def __call__(self, images: Any, return_tensors: str | None = None) -> dict[str, Any]:
        """`BridgeTowerImageProcessor`-style call: {"pixel_values", "pixel_mask"} for one image or a list.

        Images: PIL images, paths or bytes. Outputs of different sizes (no centre crop) are padded at the
        bottom/right with zeros after normalisation, `pixel_mask` marking the real pixels, as HF does; with the
        crop every mask is all ones (HF's mask does not mark the crop's padding either).
        """
        if isinstance(images, (Image.Image, str, os.PathLike, bytes)):
            images = [images]
        canvases = [self.load(im) for im in images]
        pixel_values, pixel_mask = self.collate(canvases)
        if return_tensors == "pt":
            import torch

            return {"pixel_values": torch.from_numpy(pixel_values), "pixel_mask": torch.from_numpy(pixel_mask)}
        return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def collate(self, canvases: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (N, 3, H, W) float32 and (N, H, W) int64 mask from uint8 canvases (any sizes)."""
        if not canvases:
            h, w = self.fixed_size or (0, 0)
            return np.zeros((0, 3, h, w), np.float32), np.zeros((0, h, w), np.int64)
        shapes = {c.shape for c in canvases}
        if len(shapes) == 1:
            values = self.normalize(np.stack(canvases))
            n, _, h, w = values.shape
            return values, np.ones((n, h, w), dtype=np.int64)
        h = max(c.shape[0] for c in canvases)
        w = max(c.shape[1] for c in canvases)
        values = np.zeros((len(canvases), 3, h, w), dtype=np.float32)
        mask = np.zeros((len(canvases), h, w), dtype=np.int64)
        for i, c in enumerate(canvases):
            values[i, :, : c.shape[0], : c.shape[1]] = self.normalize(c[None])[0]
            mask[i, : c.shape[0], : c.shape[1]] = 1
        return values, mask


# ---------------------------------------------------------------------------------------------------------------
# Text


def model_text_limit(folder: str | os.PathLike) -> int | None:
    """Tokens a text may have for the model in `folder`: max_position_embeddings - 2 (None if unknown)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    text = cfg.get("text_config") or {}
    n = text.get("max_position_embeddings", cfg.get("max_position_embeddings"))
    return int(n) - 2 if n else None


@dataclass
class TokenizedText:
    ids: list[int]
    truncated: bool


class TextPreprocessor:
    """The model folder's tokenizer, truncating to the model's limit and saying which texts were truncated.

    Token ids equal `tokenizer(text, truncation=True, max_length=max_length)["input_ids"]`. Very long texts
    are tokenised from a prefix cut at whitespace (a long enough prefix gives the same first tokens), so a
    megabyte of text costs what a page costs.
    """

    PREFIX_CHARS_PER_TOKEN = 64

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 1
        specials = tokenizer("", add_special_tokens=True)["input_ids"]
        self.n_special = len(specials)
        if self.max_length <= self.n_special:
            raise ValueError(f"max_length={self.max_length} leaves no room for text")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, max_length: int | None = None) -> TextPreprocessor:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        limit = model_text_limit(folder)
        candidates = [x for x in (max_length, limit) if x]
        mml = getattr(tok, "model_max_length", None)
        if mml and mml < 1_000_000:
            candidates.append(int(mml))
        if not candidates:
            candidates = [512]
        return cls(tok, min(candidates))

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "max_length": self.max_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tokenizer"], state["max_length"])  # type: ignore[misc]

    def _cut(self, text: str) -> str:
        budget = self.PREFIX_CHARS_PER_TOKEN * self.max_length
        if len(text) <= budget:
            return text
        cut = budget
        while cut < len(text) and not text[cut].isspace():  # cut just before whitespace: earlier words intact
            cut += 1
        return text[:cut]

    def encode(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Token ids (with <s> … </s>) per text, truncated to `max_length`, each flagged if it was."""
        texts = list(texts)
        cut = [self._cut(t) for t in texts]
        enc = self.tokenizer(cut, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        out: list[TokenizedText] = []
        redo = []
        for i, ids in enumerate(enc):
            if len(ids) > self.max_length:
                out.append(TokenizedText(self._truncate(ids), True))
            else:
                if cut[i] is not texts[i]:  # the prefix was too short to decide: tokenise it all
                    redo.append(i)
                out.append(TokenizedText(list(ids), False))
        if redo:
            full = self.tokenizer([texts[i] for i in redo], truncation=False, verbose=False)["input_ids"]
            for i, ids in zip(redo, full):
                out[i] = TokenizedText(
                    self._truncate(ids) if len(ids) > self.max_length else list(ids), len(ids) > self.max_length
                )
        return out

    def _truncate(self, ids: Sequence[int]) -> list[int]:
        # RoBERTa: <s> content </s>; HF's truncation keeps the first max_length - 2 content tokens.
        n_end = self.n_special - 1 if self.n_special >= 1 else 0
        head = list(ids[: self.max_length - n_end])
        return head + list(ids[len(ids) - n_end :]) if n_end else head

    def collate(self, ids: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None) -> tuple[Any, Any]:
        """Right-padded (pad id) int64 input_ids and attention_mask tensors."""
        import torch

        n = max(len(x) for x in ids)
        if pad_to_multiple_of:
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = torch.full((len(ids), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return input_ids, mask


def iter_chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    buf: list[Any] = []
    for x in items:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageConfig",
    "ImageError",
    "ImagePreprocessor",
    "TextPreprocessor",
    "TokenizedText",
    "has_alpha",
    "model_text_limit",
    "resize_output_size",
    "to_rgb",
]
