"""btfast.preprocess against transformers' BridgeTowerImageProcessor / tokenizer, wherever those work."""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from fixtures_saved_model import photo
from PIL import Image
from transformers import BridgeTowerImageProcessor, BridgeTowerProcessor
from transformers.utils import logging as hf_logging

from btfast.preprocess import (
    ImageConfig,
    ImageError,
    ImagePreprocessor,
    TextPreprocessor,
    resize_output_size,
    to_rgb,
    transparency_on_white,
)

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*torchvision.*")

MODES = ["RGB", "L", "RGBA", "CMYK", "P", "LA", "I;16", "1", "PA"]


def _image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        return im
    if mode == "PA":
        im = im.convert("P")
        im.info["transparency"] = 3
        return im
    return im if mode == "RGB" else im.convert(mode)


def _hf(size: int | None) -> BridgeTowerImageProcessor:
    if size is None:  # the defaults: 288 / 288
        return BridgeTowerImageProcessor(do_convert_rgb=True)
    # without torchvision the PIL backend crops to 288 unless crop_size is given as {"shortest_edge"}
    return BridgeTowerImageProcessor(
        size={"shortest_edge": size}, crop_size={"shortest_edge": size}, do_convert_rgb=True
    )


@pytest.mark.parametrize("size", [None, 32, 64])
def test_images_equal_hf_bit_for_bit(size):
    hf = _hf(size)
    ours = ImagePreprocessor(ImageConfig.from_processor(hf), exact=True)
    rng = np.random.default_rng(size or 0)
    compared = hf_failed = 0
    for t in range(45):
        w = int(rng.integers(3, 700))
        h = max(1, int(w * rng.uniform(0.45, 2.2)))
        if t % 5 == 0:
            w = max(1, w // 8)  # tall, often beyond HF's aspect limit
        mode = MODES[t % len(MODES)]
        im = _image(w, h, mode, t)
        mine = ours(im)
        assert mine["pixel_values"].shape == (1, 3, *ours.config.crop_size)
        assert mine["pixel_values"].dtype == np.float32
        try:
            ref = hf(im, return_tensors="np")
        except ValueError:
            hf_failed += 1  # a side rounded to 0 px: HF cannot; ours still gives a crop-sized image
            continue
        compared += 1
        np.testing.assert_array_equal(mine["pixel_values"], ref["pixel_values"], err_msg=f"{w}x{h} {mode}")
        np.testing.assert_array_equal(mine["pixel_mask"], ref["pixel_mask"])
    assert compared >= 20


def test_batch_of_mixed_sizes_equals_hf():
    hf = _hf(None)
    ours = ImagePreprocessor(ImageConfig.from_processor(hf), exact=True)
    ims = [_image(640, 480, "RGB", 1), _image(300, 900, "RGB", 2), _image(1000, 400, "L", 3)]
    ref = hf(ims, return_tensors="pt")
    mine = ours(ims, return_tensors="pt")
    assert torch.equal(mine["pixel_values"], ref["pixel_values"])
    assert torch.equal(mine["pixel_mask"], ref["pixel_mask"])


def test_without_center_crop_pads_bottom_right_like_hf():
    hf = BridgeTowerImageProcessor(size={"shortest_edge": 64}, do_center_crop=False, do_convert_rgb=True)
    ours = ImagePreprocessor(ImageConfig.from_processor(hf), exact=True)
    ims = [_image(100, 64, "RGB", 1), _image(64, 150, "RGB", 2)]
    ref = hf(ims, return_tensors="np")
    mine = ours(ims)
    assert mine["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_array_equal(mine["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(mine["pixel_mask"], ref["pixel_mask"])


@pytest.mark.parametrize("w,h", [(30, 700), (700, 30), (5, 2000), (2000, 5), (1, 1)])
def test_banners_hf_cannot_serve(w, h):
    hf = _hf(None)
    ours = ImagePreprocessor(ImageConfig.from_processor(hf))
    im = _image(w, h, "RGB", 0)
    if (w, h) != (1, 1):
        with pytest.raises(ValueError):
            hf(im, return_tensors="np")
    out = ours(im)
    assert out["pixel_values"].shape == (1, 3, 288, 288)
    assert np.isfinite(out["pixel_values"]).all()
    rh, rw = resize_output_size(h, w, ours.config)
    assert rh >= 32 and rw >= 32 and rh % 32 == 0 and rw % 32 == 0
    assert max(rh, rw) <= int(1333 / 800 * 288)


def test_resize_rule():
    cfg = ImageConfig()
    assert resize_output_size(480, 640, cfg) == (288, 384)
    assert resize_output_size(640, 480, cfg) == (384, 288)
    assert resize_output_size(400, 1000, cfg) == (192, 448)  # long side capped at 479, then floored
    assert resize_output_size(30, 700, cfg) == (32, 448)  # HF: (0, 448) and a crash


def test_config_from_saved_folder(saved_models):
    folder = saved_models["itm"]
    proc = BridgeTowerProcessor.from_pretrained(str(folder))
    cfg = ImageConfig.from_pretrained(folder)
    assert cfg == ImageConfig.from_processor(proc)
    assert cfg.size == 32 and cfg.crop_size == (32, 32) and cfg.resample == 3
    ours = ImagePreprocessor(cfg, exact=True)
    im = photo(90, 60, 3)
    ref = proc.image_processor(im, return_tensors="np", do_convert_rgb=True)
    np.testing.assert_array_equal(ours(im)["pixel_values"], ref["pixel_values"])


def test_torch_normalisation_equals_numpy():
    ours = ImagePreprocessor()
    canv = np.stack([ours.canvas(_image(500, 400, "RGB", s)) for s in range(3)])
    np.testing.assert_array_equal(ours.normalize_torch(torch.from_numpy(canv)).numpy(), ours.normalize(canv))


def _jpeg(w: int, h: int, seed: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    photo(w, h, seed).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_draft_decode_is_close_and_exact_decode_is_exact():
    data = _jpeg(1600, 1200, 1)
    hf = _hf(None)
    ref = hf(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"]
    exact = ImagePreprocessor(exact=True)
    np.testing.assert_array_equal(exact(data)["pixel_values"], ref)
    assert ImagePreprocessor().exact, "bit-exact preprocessing is the default"
    fast = ImagePreprocessor(exact=False)
    img = fast.open(data)
    assert img.size == (800, 600)  # decoded at 1/2 scale: still >= 2x the 384x288 target
    diff = np.abs(fast(data)["pixel_values"] - ref)
    assert diff.mean() < 0.02 and diff.max() < 0.2  # a few levels of 255 (1 level = ~0.015 after std)
    small = _jpeg(300, 200, 2)  # no smaller decode possible: exact either way
    np.testing.assert_array_equal(fast(small)["pixel_values"], exact(small)["pixel_values"])
    cmyk = _jpeg(1200, 900, 3, "CMYK")
    assert fast(cmyk)["pixel_values"].shape == (1, 3, 288, 288)


def test_bad_images_raise_image_error(tmp_path):
    pre = ImagePreprocessor(max_pixels=1_000_000)
    data = _jpeg(200, 150, 4)
    cases = {
        "missing": (tmp_path / "nope.jpg", "missing file"),
        "truncated": (data[: len(data) // 2], "truncated"),
        "garbage": (b"not an image at all", "not an image"),
        "empty": (b"", "not an image"),
        "header only": (data[:20], "truncated|corrupt|not an image"),
    }
    for src, reason in cases.values():
        with pytest.raises(ImageError, match=reason):
            pre.load(src)
    big = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(big, "PNG")
    with pytest.raises(ImageError, match="too large"):
        pre.load(big.getvalue())
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError):
        pre.load(tmp_path / "dir.jpg")


def test_pickle_round_trip_for_workers():
    import pickle

    pre = ImagePreprocessor(ImageConfig(size=64, crop_size=(64, 64)), exact=True, max_pixels=123)
    back = pickle.loads(pickle.dumps(pre))
    assert back.config == pre.config and back.max_pixels == 123 and back.exact
    np.testing.assert_array_equal(back.lut, pre.lut)


# ---- text ------------------------------------------------------------------------------------------------------


def test_tokens_equal_hf_truncation(saved_models):
    from transformers import AutoTokenizer

    folder = saved_models["itm"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    pre = TextPreprocessor.from_pretrained(folder)
    assert pre.max_length == 38  # tiny config: 40 positions - 2
    texts = ["a photo of a dog", "dog " * 5, "the red car " * 40, "  spaces  around ", "é ü 🙂 unicode"]
    got = pre.encode(texts)
    for t, g in zip(texts, got):
        ref = tok(t, truncation=True, max_length=38)["input_ids"]
        assert g.ids == ref
        assert g.truncated == (len(tok(t)["input_ids"]) > 38)
    assert [g.truncated for g in got] == [False, False, True, False, False]


def test_huge_text_is_cut_before_tokenising_with_the_same_tokens(saved_models):
    from transformers import AutoTokenizer

    folder = saved_models["itm"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    pre = TextPreprocessor.from_pretrained(folder)
    text = "a small dog on the grass " * 20000  # 500k characters
    assert len(pre._cut(text)) < len(text)
    (g,) = pre.encode([text])
    assert g.truncated and g.ids == tok(text, truncation=True, max_length=38)["input_ids"]
    one_word = "x" * 100_000  # no whitespace: cut cannot help, still right
    (g,) = pre.encode([one_word])
    assert g.ids == tok(one_word, truncation=True, max_length=38)["input_ids"]


def test_collate_pads_with_pad_id(saved_models):
    pre = TextPreprocessor.from_pretrained(saved_models["itm"])
    ids, mask = pre.collate([[0, 5, 2], [0, 2]])
    assert ids.tolist() == [[0, 5, 2], [0, 2, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_transparency_follows_the_installed_transformers():
    """transformers 5.17 and older drop the alpha band; newer releases composite it on white: exact mode follows."""
    clear = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    assert np.asarray(to_rgb(clear, on_white=True)).min() == 255
    assert (np.asarray(to_rgb(clear, on_white=False)) == (10, 20, 30)).all()
    hf = BridgeTowerImageProcessor(do_convert_rgb=True)(clear, return_tensors="np")["pixel_values"]
    mine = ImagePreprocessor()
    assert mine.alpha_on_white == transparency_on_white()
    np.testing.assert_array_equal(mine([clear], return_tensors="np")["pixel_values"], hf)
    copy = pickle.loads(pickle.dumps(ImagePreprocessor(alpha_on_white=not mine.alpha_on_white)))
    assert copy.alpha_on_white is not mine.alpha_on_white  # worker processes keep the parent's choice


# ---- real-world files: transparency, EXIF orientation, format probing, plugin errors ---------------------------


def _hf_pixels(im: Image.Image, size: int = 64) -> np.ndarray:
    return _hf(size)(im, return_tensors="np")["pixel_values"]


def _ours(size: int = 64, **kw) -> ImagePreprocessor:
    return ImagePreprocessor(ImageConfig.from_processor(_hf(size)), exact=True, **kw)


def test_rgb_png_with_a_transparent_colour_is_composited_like_hf(tmp_path):
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 4, (50, 70, 3), dtype=np.uint8) * 60  # few colours: (0, 0, 0) is common
    path = tmp_path / "trns.png"
    Image.fromarray(arr).save(path, transparency=(0, 0, 0))
    opened = Image.open(path)
    assert opened.mode == "RGB" and opened.info.get("transparency") == (0, 0, 0)
    ref = _hf_pixels(Image.open(path))
    mine = _ours()
    np.testing.assert_array_equal(mine(path)["pixel_values"], ref)
    np.testing.assert_array_equal(mine(Image.open(path))["pixel_values"], ref)
    if transparency_on_white():  # the transparent colour became white: not the stored black
        plain = _hf_pixels(Image.fromarray(arr))
        assert not np.array_equal(ref, plain)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_applied_by_default_as_load_image_and_kept_raw_on_request(tmp_path, orientation):
    from transformers.image_utils import load_image

    path = tmp_path / f"phone{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo(90, 40, orientation).save(path, quality=92, exif=exif)
    upright = _ours()(path)["pixel_values"]
    np.testing.assert_array_equal(upright, _hf_pixels(load_image(str(path))))  # transformers' path loader
    raw = _ours(exif_orientation=False)(path)["pixel_values"]
    np.testing.assert_array_equal(raw, _hf_pixels(Image.open(path)))  # the stored pixels
    assert np.array_equal(upright, raw) == (orientation == 1)
    data = path.read_bytes()  # bytes (a Parquet column) are turned upright too
    np.testing.assert_array_equal(_ours()(data)["pixel_values"], upright)


def test_a_path_opens_as_its_extensions_format_first(tmp_path, monkeypatch):
    """A long-lived worker's probe order may let TGA claim a valid .ico; the extension's format is tried first."""
    path = tmp_path / "icon.ico"
    photo(48, 48, 1).save(path, sizes=[(48, 48)])
    misnamed = tmp_path / "really_a_png.jpg"  # a wrong extension still loads, by probing
    photo(40, 30, 2).save(misnamed, "PNG")
    np.testing.assert_array_equal(_ours()(misnamed)["pixel_values"], _hf_pixels(Image.open(misnamed)))
    from PIL import ImageFile

    class Greedy(ImageFile.ImageFile):  # claims any file, then cannot decode it (as TGA did with an .ico)
        format = "GREEDY"

        def _open(self):
            self._mode, self._size = "RGB", (8, 8)
            self.tile = [ImageFile._Tile("raw", (0, 0, 8, 8), 10**6, ("RGB", 0, 1))]

    Image.init()
    monkeypatch.setitem(Image.OPEN, "GREEDY", (Greedy, None))
    monkeypatch.setattr(Image, "ID", ["GREEDY", *Image.ID])
    with pytest.raises(OSError):
        Image.open(path).load()  # probing alone goes wrong
    ref = _hf_pixels(Image.open(path, formats=["ICO"]))
    np.testing.assert_array_equal(_ours()(path)["pixel_values"], ref)


def test_not_implemented_in_a_plugin_is_an_image_error(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "odd.png"
    photo(40, 30, 3).save(path)

    def unsupported(self):
        raise NotImplementedError("Unimplemented pixel format")

    monkeypatch.setattr(ImageFile.ImageFile, "load", unsupported)
    pre = ImagePreprocessor()
    with pytest.raises(ImageError, match="unsupported image variant: Unimplemented pixel format"):
        pre.load(path)
    assert pre.load_or_reason(path).startswith("unsupported image variant")
