"""`btfast embed` and `btfast retrieve` on saved tiny models: embeddings equal HF's, ITC top-k then ITM re-rank;
retrieve resumes after kill -9, its shards join to the unsharded output, a rerun with other settings is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_saved_model import sentences, write_images, write_jsonl
from jobs import (
    kill_after_chunks,
    one_torch_thread,  # noqa: F401  (autouse: one torch thread)
)
from PIL import Image

from btfast.cli import main
from btfast.score import retrieve as retrieve_module
from btfast.score.retrieve import GALLERY_SUFFIX


def run(cmd: str, *argv) -> int:
    return main([cmd, "--no-progress", "--threads", "1", *map(str, argv)])


def read(path: Path) -> list[dict]:
    if str(path).endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    imgs = root / "imgs"
    names = write_images(imgs, n=6, seed=20)
    (imgs / "sub").mkdir()
    Image.open(imgs / names[0]).save(imgs / "sub" / "copy.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    texts = sentences(8, seed=21)
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    return {
        "root": root,
        "imgs": imgs,
        "texts": texts,
        "txt": root / "texts.txt",
        "images": sorted([*names, "sub/copy.png", "broken.jpg"]),
    }


def _hf_embeddings(folder: Path, imgs: Path, names: list[str], texts: list[str]):
    from transformers import BridgeTowerForContrastiveLearning, BridgeTowerProcessor

    proc = BridgeTowerProcessor.from_pretrained(str(folder))
    model = BridgeTowerForContrastiveLearning.from_pretrained(str(folder), attn_implementation="eager").eval()
    img_e, txt_e = {}, {}
    with torch.no_grad():
        for n in names:
            try:
                enc = proc(images=Image.open(imgs / n), text="a", return_tensors="pt", do_convert_rgb=True)
            except ValueError:  # beyond HF's aspect limit at 32 px
                continue
            img_e[n] = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}).image_embeds[0]
        px = proc(images=Image.open(imgs / names[0]), text="a", return_tensors="pt")["pixel_values"]
        for t in texts:
            enc = proc.tokenizer(t, return_tensors="pt", truncation=True, max_length=38)
            txt_e[t] = model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px
            ).text_embeds[0]
    return img_e, txt_e


def test_embed_equals_hf(saved_models, gallery, tmp_path):
    out = tmp_path / "emb.parquet"
    rc = run(
        "embed",
        "--model",
        saved_models["itc"],
        "--images",
        gallery["imgs"],
        "--texts",
        gallery["txt"],
        "--out",
        out,
        "--workers",
        1,
    )
    assert rc == 3  # broken.jpg
    rows = read(out)
    imgs = [r for r in rows if r["kind"] == "image"]
    txts = [r for r in rows if r["kind"] == "text"]
    assert [r["image"] for r in imgs] == gallery["images"]
    assert [r["text"] for r in txts] == gallery["texts"]
    broken = next(r for r in imgs if r["image"] == "broken.jpg")
    assert broken["status"] == "error" and broken["embedding"] is None
    ok_names = [r["image"] for r in imgs if r["status"] == "ok"]
    hf_img, hf_txt = _hf_embeddings(saved_models["itc"], gallery["imgs"], ok_names, gallery["texts"])
    assert len(hf_img) >= 4
    for r in imgs:
        if r["image"] in hf_img:
            np.testing.assert_allclose(r["embedding"], hf_img[r["image"]].numpy(), atol=1e-5)
    for r in txts:
        e = np.asarray(r["embedding"])
        assert abs(np.linalg.norm(e) - 1) < 1e-5
        np.testing.assert_allclose(e, hf_txt[r["text"]].numpy(), atol=1e-5)
    # identical pictures, identical embeddings
    by = {r["image"]: r["embedding"] for r in imgs}
    assert by["sub/copy.png"] == by[gallery["images"][gallery["images"].index("img000.png")]]


def test_retrieve_itc_topk_reranked_by_itm(saved_models, gallery, tmp_path):
    emb = tmp_path / "emb.jsonl"
    run(
        "embed",
        "--model",
        saved_models["itc"],
        "--images",
        gallery["imgs"],
        "--texts",
        gallery["txt"],
        "--out",
        emb,
        "--workers",
        0,
    )
    e = read(emb)
    img = {r["image"]: np.asarray(r["embedding"]) for r in e if r["kind"] == "image" and r["status"] == "ok"}
    txt = {r["text"]: np.asarray(r["embedding"]) for r in e if r["kind"] == "text"}

    out = tmp_path / "ret.jsonl"
    k = 3
    rc = run(
        "retrieve",
        "--model",
        saved_models["itm"],
        "--itc-model",
        saved_models["itc"],
        "--images",
        gallery["imgs"],
        "--texts",
        gallery["txt"],
        "--top-k",
        k,
        "--out",
        out,
        "--workers",
        1,
    )
    assert rc == 3
    rows = read(out)
    t2i = [r for r in rows if r["direction"] == "text_to_image"]
    i2t = [r for r in rows if r["direction"] == "image_to_text"]
    assert [r["query"] for r in t2i] == gallery["texts"]
    assert [r["query"] for r in i2t] == gallery["images"]
    assert next(r for r in i2t if r["query"] == "broken.jpg")["status"] == "error"

    pairs_to_score = []
    for r in t2i:
        sims = {n: float(txt[r["query"]] @ v) for n, v in img.items()}
        best = sorted(sims.values(), reverse=True)[:k]  # (img000 and sub/copy are one picture: compare values)
        got = sorted((sims[x["item"]] for x in r["results"]), reverse=True)
        assert got == pytest.approx(best, abs=1e-6)  # ITC picked the candidates
        logits = [x["itm_logit"] for x in r["results"]]
        assert logits == sorted(logits, reverse=True)  # ITM ranked them
        assert [x["rank"] for x in r["results"]] == [1, 2, 3]
        for x in r["results"]:
            assert x["itc_cosine"] == pytest.approx(sims[x["item"]], abs=1e-5)
            pairs_to_score.append(
                {"image": x["item"], "text": r["query"], "id": len(pairs_to_score), "logit": x["itm_logit"]}
            )
    for r in i2t:
        if r["status"] == "ok":
            assert len(r["results"]) == k and all(x["item"] in txt for x in r["results"])

    # the re-ranking logits are the ITM scores `btfast score` gives for those pairs
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs_to_score)
    scored = tmp_path / "scored.jsonl"
    run(
        "score",
        "--model",
        saved_models["itm"],
        "--pairs",
        pairs,
        "--image-root",
        gallery["imgs"],
        "--out",
        scored,
        "--workers",
        0,
    )
    for p, s in zip(pairs_to_score, sorted(read(scored), key=lambda r: r["row"])):
        assert s["itm_logit"] == pytest.approx(p["logit"], abs=1e-5)


def test_retrieve_itc_only_to_parquet(saved_models, gallery, tmp_path):
    out = tmp_path / "ret.parquet"
    rc = run(
        "retrieve",
        "--itc-model",
        saved_models["itc"],
        "--no-rerank",
        "--images",
        gallery["imgs"],
        "--texts",
        gallery["txt"],
        "--top-k",
        50,
        "--out",
        out,
        "--workers",
        0,
    )
    assert rc == 3
    rows = read(out)
    for r in rows:
        if r["status"] == "ok":
            cos = [x["itc_cosine"] for x in r["results"]]
            assert cos == sorted(cos, reverse=True)
            assert len(cos) == (7 if r["direction"] == "text_to_image" else 8)  # k capped at the gallery
            assert all(x["itm_logit"] is None for x in r["results"])


def test_retrieve_refuses_a_folder_without_itc_weights(saved_models, gallery, tmp_path, capsys):
    rc = run(
        "retrieve",
        "--model",
        saved_models["itm"],
        "--images",
        gallery["imgs"],
        "--texts",
        gallery["txt"],
        "--out",
        tmp_path / "x.jsonl",
        "--workers",
        0,
    )
    assert rc == 1 and "lacks weights" in capsys.readouterr().err


# ---- resume, shards, refusal ---------------------------------------------------------------------------------------


def retrieve_args(saved_models, gallery, texts, *extra) -> list[str]:
    return [
        "--model",
        saved_models["itm"],
        "--itc-model",
        saved_models["itc"],
        "--images",
        gallery["imgs"],
        "--texts",
        texts,
        "--top-k",
        3,
        "--workers",
        0,
        *extra,
    ]


def queries(rows: list[dict]) -> list[tuple[str, int]]:
    return [(r["direction"], r["query_row"]) for r in rows]


def expected_queries(n_texts: int, n_images: int) -> list[tuple[str, int]]:
    return [("text_to_image", k) for k in range(n_texts)] + [("image_to_text", k) for k in range(n_images)]


def test_retrieve_kill_9_and_resume(saved_models, gallery, tmp_path, capsys, monkeypatch):
    """SIGKILL a real run after its first query chunks are written; the rerun completes it exactly."""
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sentences(240, seed=31)) + "\n")
    args = [
        "retrieve",
        "--no-progress",
        "--threads",
        "1",
        *map(str, retrieve_args(saved_models, gallery, texts, "--chunk-queries", 2)),
    ]
    out = tmp_path / "killed.jsonl"
    done_before = kill_after_chunks(args, out, chunks=3, how="STOP")
    assert done_before == 3
    cache = Path(str(out) + GALLERY_SUFFIX)
    assert cache.exists()  # the gallery's ITC embeddings, kept for the rerun
    embedded = []
    embed_all = retrieve_module._embed_all
    monkeypatch.setattr(retrieve_module, "_embed_all", lambda *a, **k: embedded.append(a[4]) or embed_all(*a, **k))
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 3  # broken.jpg: its query row has status error
    err = capsys.readouterr().err
    assert f"{2 * done_before:,} resumed from an earlier run" in err
    assert "ITC embeddings are reused" in err and embedded == []  # the rerun embedded nothing
    assert not cache.exists()  # the job finished: the cache is gone
    ref = tmp_path / "uninterrupted.jsonl"
    assert main([*args, "--out", str(ref)]) == 3
    assert embedded == ["itc images", "itc texts"] and not Path(str(ref) + GALLERY_SUFFIX).exists()
    got = read(out)
    assert queries(got) == expected_queries(240, 8)  # every query exactly once, in order
    assert got == read(ref)
    assert out.read_bytes() == ref.read_bytes()


def test_retrieve_interrupted_parquet_run_resumes(saved_models, gallery, tmp_path, monkeypatch):
    """An interrupt after two query chunks (their Parquet parts written) and a rerun give the uninterrupted output."""
    from btfast.score.retrieve import _Ranker

    args = retrieve_args(saved_models, gallery, gallery["txt"], "--chunk-queries", 3)
    ref = tmp_path / "ref.parquet"
    assert run("retrieve", *args, "--out", ref) == 3
    rank = _Ranker.__call__
    calls = []

    def interrupted(self, chunk, canvases):
        calls.append(chunk.index)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return rank(self, chunk, canvases)

    out = tmp_path / "out.parquet"
    monkeypatch.setattr(_Ranker, "__call__", interrupted)
    assert run("retrieve", *args, "--out", out) == 130
    assert not out.exists() and len(list(Path(str(out) + ".btfast-parts").glob("*.parquet"))) == 2
    monkeypatch.setattr(_Ranker, "__call__", rank)
    assert run("retrieve", *args, "--out", out) == 3
    assert read(out) == read(ref)
    assert queries(read(out)) == expected_queries(8, 8)


def test_retrieve_shards_join_to_the_unsharded_result(saved_models, gallery, tmp_path):
    args = retrieve_args(saved_models, gallery, gallery["txt"], "--chunk-queries", 2)
    assert run("retrieve", *args, "--out", tmp_path / "all.parquet") == 3
    joined = []
    for i in range(3):
        run("retrieve", *args, "--out", tmp_path / f"s{i}.parquet", "--shard", f"{i}/3")
        part = read(tmp_path / f"s{i}.parquet")
        assert {r["direction"] for r in part} == {"text_to_image", "image_to_text"}  # both directions
        joined += part
    order = {q: n for n, q in enumerate(expected_queries(8, 8))}
    joined.sort(key=lambda r: order[(r["direction"], r["query_row"])])
    assert joined == read(tmp_path / "all.parquet")


def test_retrieve_rerun_with_other_settings_is_refused(saved_models, gallery, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = retrieve_args(saved_models, gallery, gallery["txt"])
    assert run("retrieve", *args, "--out", out) == 3
    before = out.read_bytes()
    assert run("retrieve", *args, "--out", out) == 3  # a finished job reruns as a no-op
    assert out.read_bytes() == before
    other_texts = tmp_path / "other.txt"
    other_texts.write_text("a dog\n")
    capsys.readouterr()
    for changed, differs in (
        (["--top-k", 2], "top_k"),
        (["--itc-model", saved_models["itm"]], "itc_model"),
        (["--texts", other_texts], "texts"),
        (["--shard", "0/2"], "shard"),
        (["--no-rerank"], "itm_model"),
    ):
        assert run("retrieve", *args, *changed, "--out", out) == 1, changed
        err = capsys.readouterr().err
        assert "different job" in err and differs in err, err
    assert out.read_bytes() == before
    assert run("retrieve", *args, "--top-k", 2, "--out", out, "--overwrite") == 3
    assert all(len(r["results"]) == 2 for r in read(out) if r["status"] == "ok")


def test_retrieve_missing_column_is_fatal_and_the_flag_picks_another(saved_models, gallery, tmp_path, capsys):
    texts = write_jsonl(tmp_path / "caps.jsonl", [{"caption": t} for t in gallery["texts"]])
    args = retrieve_args(saved_models, gallery, texts, "--no-rerank")
    assert run("retrieve", *args, "--out", tmp_path / "a.jsonl") == 1
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "--text-column" in err, err
    assert run("retrieve", *args, "--text-column", "caption", "--out", tmp_path / "b.jsonl") == 3  # broken.jpg
    assert len(read(tmp_path / "b.jsonl")) == len(gallery["texts"]) + len(gallery["images"])
