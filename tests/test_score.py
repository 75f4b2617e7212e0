"""`btfast score` end to end on saved tiny models: equality with HF, bad data, formats, sharding, resume, kill -9."""

from __future__ import annotations

import csv
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from fixtures_saved_model import sentences, write_bad_images, write_images, write_jsonl
from jobs import (
    kill_after_chunks,
    one_torch_thread,  # noqa: F401  (autouse: one torch thread)
)
from PIL import Image

from btfast.cli import main


def read_out(path: Path) -> list[dict]:
    if str(path).endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return sorted(rows, key=lambda r: r["row"])


def score(*argv: str) -> int:
    return main(["score", "--no-progress", "--threads", "1", *map(str, argv)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_data")
    imgs = root / "imgs"
    good = write_images(imgs, n=6)
    bad = write_bad_images(imgs)
    texts = sentences(8, seed=3)
    rows = []
    for name in good:  # all pairs of 6 images × 5 texts, texts repeated across images
        for t in texts[:5]:
            rows.append({"image": name, "text": t, "id": f"p{len(rows)}"})
    for name in bad:
        rows.append({"image": name, "text": texts[5], "id": f"bad-{name}"})
    rows += [
        {"image": "nope.jpg", "text": "a dog", "id": "missing"},
        {"image": good[0], "text": "", "id": "empty-text"},
        {"image": good[0], "text": "   ", "id": "blank-text"},
        {"image": good[1], "text": "a red car on the street " * 30, "id": "long-text"},
        {"text": "no image field", "id": "no-image"},
        {"image": good[0], "id": "no-text"},
        {"image": good[0], "text": 42, "id": "number-text"},
        {"image": "../outside.png", "text": "a dog", "id": "escape"},
        {"image": "/etc/hostname", "text": "a dog", "id": "absolute"},
        {"image": "evil.pkl", "text": "a dog", "id": "pickle"},
    ]
    # a pickle that would create a file if anything unpickled it
    sentinel = root / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    (imgs / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    pairs = write_jsonl(root / "pairs.jsonl", rows)
    with open(pairs, "a", encoding="utf-8") as f:
        f.write('{"image": "img000.png", "text": broken json\n')
        f.write("[1, 2, 3]\n")
    return {"root": root, "imgs": imgs, "pairs": pairs, "rows": rows, "good": good, "bad": bad, "sentinel": sentinel}


def _hf_reference(folder: Path, head: str, imgs: Path, rows: list[dict]) -> dict[str, float]:
    """id -> HF eager score (ITM logit 1, or ITC cosine) with BridgeTowerProcessor, pair by pair."""
    from transformers import (
        BridgeTowerForContrastiveLearning,
        BridgeTowerForImageAndTextRetrieval,
        BridgeTowerProcessor,
    )

    cls = BridgeTowerForImageAndTextRetrieval if head == "itm" else BridgeTowerForContrastiveLearning
    proc = BridgeTowerProcessor.from_pretrained(str(folder))
    model = cls.from_pretrained(str(folder), attn_implementation="eager").eval()
    ref = {}
    for r in rows:
        try:
            img = Image.open(imgs / r["image"])
            enc = proc(
                images=img, text=r["text"], return_tensors="pt", truncation=True, max_length=38, do_convert_rgb=True
            )
        except Exception:  # HF cannot (e.g. aspect beyond its limit at 32 px): not comparable
            continue
        with torch.no_grad():
            out = model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"]
            )
        if head == "itm":
            ref[r["id"]] = out.logits[0, 1].item()
        else:
            ref[r["id"]] = (out.text_embeds[0] * out.image_embeds[0]).sum().item()
    return ref


def test_itm_scores_equal_hf_eager(saved_models, data, tmp_path):
    out = tmp_path / "itm.jsonl"
    rc = score(
        "--model",
        saved_models["itm"],
        "--pairs",
        data["pairs"],
        "--image-root",
        data["imgs"],
        "--out",
        out,
        "--workers",
        1,
        "--exact",
    )
    assert rc == 3  # done, with error rows
    got = {r["id"]: r for r in read_out(out)}
    good = [r for r in data["rows"] if r["id"].startswith(("p", "bad-", "long"))]
    ref = _hf_reference(saved_models["itm"], "itm", data["imgs"], good)
    assert len(ref) >= 24
    for k, v in ref.items():
        assert got[k]["status"] == "ok", got[k]
        assert got[k]["itm_logit"] == pytest.approx(v, abs=1e-4), k
        p = got[k]["itm_prob"]
        assert 0 < p < 1
    # prob is softmax(logits)[1]: check against the logit margin of one row through HF's processor too
    assert got["long-text"]["text_truncated"] is True and got["p0"]["text_truncated"] is False


def test_itc_cosines_equal_hf_eager(saved_models, data, tmp_path):
    out = tmp_path / "itc.parquet"
    rc = score(
        "--model",
        saved_models["itc"],
        "--head",
        "itc",
        "--pairs",
        data["pairs"],
        "--image-root",
        data["imgs"],
        "--out",
        out,
        "--workers",
        0,
        "--exact",
    )
    assert rc == 3
    got = {r["id"]: r for r in read_out(out)}
    good = [r for r in data["rows"] if r["id"][0] == "p" and r["id"][1:].isdigit()]
    ref = _hf_reference(saved_models["itc"], "itc", data["imgs"], good)
    assert len(ref) >= 20
    from safetensors.torch import load_file

    weights = load_file(str(saved_models["itc"] / "model.safetensors"))
    scale = math.exp(float(weights["logit_scale"]))
    for k, v in ref.items():
        assert got[k]["itc_cosine"] == pytest.approx(v, abs=1e-5)
        assert got[k]["itc_logit"] == pytest.approx(v * scale, rel=1e-5, abs=1e-5)
    assert not (Path(str(out) + ".btfast-parts")).exists()  # parts joined and removed


def test_dedup_equals_pair_by_pair_and_hf_engine(saved_models, data, tmp_path):
    outs = {}
    for name, extra in {"dedup": [], "pairs": ["--no-dedup"], "hf": ["--engine", "hf"]}.items():
        outs[name] = tmp_path / f"{name}.jsonl"
        score(
            "--model",
            saved_models["itm"],
            "--pairs",
            data["pairs"],
            "--image-root",
            data["imgs"],
            "--out",
            outs[name],
            "--workers",
            0,
            *extra,
        )
    a, b, c = (read_out(outs[k]) for k in ("dedup", "pairs", "hf"))
    assert [r["status"] for r in a] == [r["status"] for r in b] == [r["status"] for r in c]
    for x, y, z in zip(a, b, c):
        if x["status"] == "ok":
            assert x["itm_logit"] == pytest.approx(y["itm_logit"], abs=1e-5)
            assert x["itm_logit"] == pytest.approx(z["itm_logit"], abs=1e-4)


def test_bad_data_rows_and_reasons(saved_models, data, tmp_path):
    out = tmp_path / "bad.jsonl"
    rc = score(
        "--model",
        saved_models["itm"],
        "--pairs",
        data["pairs"],
        "--image-root",
        data["imgs"],
        "--out",
        out,
        "--workers",
        1,
    )
    assert rc == 3
    rows = read_out(out)
    n_input = len(data["rows"]) + 2
    assert [r["row"] for r in rows] == list(range(n_input))  # every input row exactly once
    by_id = {r["id"]: r for r in rows}
    for name, kind in data["bad"].items():
        r = by_id[f"bad-{name}"]
        if kind in ("corrupt", "truncated"):
            assert r["status"] == "error" and r["error"].startswith("image:"), r
            if kind == "truncated":
                assert "truncated" in r["error"]
        else:  # grayscale, CMYK, alpha, palette, banners, huge: served
            assert r["status"] == "ok" and math.isfinite(r["itm_logit"]), r
    expect = {
        "missing": "missing file",
        "empty-text": "text: empty",
        "blank-text": "text: empty",
        "no-image": "missing field 'image'",
        "no-text": "missing field 'text'",
        "number-text": "must be a string",
        "escape": "leaves --image-root",
        "absolute": "leaves --image-root",
        "pickle": "not an image",
    }
    for k, reason in expect.items():
        assert by_id[k]["status"] == "error" and reason in by_id[k]["error"], by_id[k]
    assert "malformed JSON" in rows[-2]["error"] and "not an object" in rows[-1]["error"]
    assert by_id["long-text"]["status"] == "ok" and by_id["long-text"]["text_truncated"]
    assert not data["sentinel"].exists()  # nothing was unpickled


def test_huge_image_refused_by_max_pixels(saved_models, data, tmp_path):
    out = tmp_path / "mp.jsonl"
    pairs = write_jsonl(
        tmp_path / "p.jsonl", [{"image": "huge.jpg", "text": "a dog"}, {"image": "img000.png", "text": "a dog"}]
    )
    assert (
        score(
            "--model",
            saved_models["itm"],
            "--pairs",
            pairs,
            "--image-root",
            data["imgs"],
            "--out",
            out,
            "--workers",
            0,
            "--max-pixels",
            1_000_000,
        )
        == 3
    )
    a, b = read_out(out)
    assert a["status"] == "error" and "too large" in a["error"] and b["status"] == "ok"


def test_csv_parquet_inputs_give_the_same_scores(saved_models, data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for r in data["rows"] if r["id"][0] == "p" and r["id"][1:].isdigit()]
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "text"])
        w.writeheader()
        w.writerows(rows)
        f.write("only,two\n")  # malformed: 2 fields
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    res = {}
    for fmt in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"out_{fmt}.jsonl"
        rc = score(
            "--model",
            saved_models["itm"],
            "--pairs",
            tmp_path / f"pairs.{fmt}",
            "--image-root",
            data["imgs"],
            "--out",
            out,
            "--workers",
            0,
        )
        assert rc == (3 if fmt == "csv" else 0)
        res[fmt] = read_out(out)
    assert "malformed row" in res["csv"][-1]["error"]
    assert res["csv"][:-1] == res["jsonl"] == res["parquet"]


def test_shards_join_to_the_unsharded_result(saved_models, data, tmp_path):
    common = [
        "--model",
        saved_models["itm"],
        "--pairs",
        data["pairs"],
        "--image-root",
        data["imgs"],
        "--workers",
        0,
        "--chunk-rows",
        7,
        "--chunk-images",
        2,
    ]
    score(*common, "--out", tmp_path / "all.jsonl")
    joined = []
    for i in range(3):
        score(*common, "--out", tmp_path / f"s{i}.jsonl", "--shard", f"{i}/3")
        part = read_out(tmp_path / f"s{i}.jsonl")
        assert part  # every shard got work
        joined += part
    assert sorted(joined, key=lambda r: r["row"]) == read_out(tmp_path / "all.jsonl")


def test_resume_after_a_torn_write(saved_models, data, tmp_path):
    common = [
        "--model",
        saved_models["itm"],
        "--pairs",
        data["pairs"],
        "--image-root",
        data["imgs"],
        "--workers",
        0,
        "--chunk-rows",
        6,
    ]
    ref = tmp_path / "ref.jsonl"
    score(*common, "--out", ref)
    out = tmp_path / "out.jsonl"
    score(*common, "--out", out)
    # Pretend the run died while writing chunk 3: keep 3 records, leave a half-written chunk after them.
    prog = Path(str(out) + ".btfast-progress")
    lines = prog.read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:4]]
    prog.write_text("\n".join(lines[:4]) + '\n{"chunk": 3, "ro')
    with open(out, "r+b") as f:
        f.truncate(recs[-1]["end"] + 100)
    assert score(*common, "--out", out) == 3
    assert read_out(out) == read_out(ref)
    # a finished job reruns as a no-op
    before = out.read_bytes()
    assert score(*common, "--out", out) == 3
    assert out.read_bytes() == before


def test_other_job_is_refused_overwrite_restarts(saved_models, data, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    common = ["--pairs", data["pairs"], "--image-root", data["imgs"], "--workers", 0, "--out", out]
    score("--model", saved_models["itm"], *common)
    assert score("--model", saved_models["itc"], "--head", "itc", *common) == 1
    assert "different job" in capsys.readouterr().err
    assert score("--model", saved_models["itc"], "--head", "itc", *common, "--overwrite") == 3
    assert "itc_cosine" in read_out(out)[0]
    (tmp_path / "foreign.jsonl").write_text("not ours\n")
    assert score("--model", saved_models["itm"], *common[:-1], tmp_path / "foreign.jsonl") == 1


def test_wrong_head_and_pickled_weights_are_refused(saved_models, data, tmp_path, capsys):
    common = ["--pairs", data["pairs"], "--image-root", data["imgs"], "--workers", 0]
    assert score("--model", saved_models["itc"], "--head", "itm", *common, "--out", tmp_path / "a.jsonl") == 1
    assert "lacks weights" in capsys.readouterr().err
    folder = tmp_path / "binmodel"
    shutil.copytree(saved_models["itm"], folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickled things")
    assert score("--model", folder, *common, "--out", tmp_path / "b.jsonl") == 1
    assert "safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["KILL", "STOP"])
def test_kill_9_and_resume(saved_models, data, tmp_path, how):
    """SIGKILL a real run after its first chunks are written (by itself, or stopped there and killed from outside);
    the rerun completes it exactly."""
    rows = []
    texts = sentences(40, seed=11)
    for i in range(1500):
        rows.append({"image": data["good"][i % len(data["good"])], "text": texts[i % len(texts)], "id": i})
    rows[17] = {"image": "corrupt.jpg", "text": "x", "id": 17}
    pairs = write_jsonl(tmp_path / "big.jsonl", rows)
    args = [
        "score",
        "--no-progress",
        "--threads",
        "1",
        "--model",
        str(saved_models["itm"]),
        "--pairs",
        str(pairs),
        "--image-root",
        str(data["imgs"]),
        "--workers",
        "0",
        "--chunk-rows",
        "4",
        "--chunk-images",
        "1",
    ]
    out = tmp_path / "killed.jsonl"
    assert kill_after_chunks(args, out, chunks=3, how=how) == 3
    assert main([*args, "--out", str(out)]) == 3
    ref = tmp_path / "uninterrupted.jsonl"
    assert main([*args, "--out", str(ref)]) == 3
    got = read_out(out)
    assert [r["row"] for r in got] == list(range(1500))  # every row exactly once
    assert got == read_out(ref)


def test_python_api_scorer(saved_models, data):
    from btfast.score.engine import Scorer

    s = Scorer(saved_models["itm"], image_root=data["imgs"], device="cpu")
    recs = [{"image": data["good"][0], "text": "a dog", "id": "x"}, {"image": "nope.png", "text": "a dog"}]
    out = s(recs)
    assert out[0]["status"] == "ok" and out[1]["status"] == "error" and out[1]["id"] == 1
    cols = s({"image": [data["good"][0]], "text": ["a dog"]})  # Ray Data's columnar batches
    assert cols["itm_logit"] == [out[0]["itm_logit"]]


def test_help_explains_every_flag(capsys):
    for cmd in ("score", "retrieve", "embed"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        for flag in ("--device", "--dtype", "--batch-size", "--workers", "--exact", "--out"):
            assert flag in text, (cmd, flag)
        assert "default" in text and "exit status" in text


# ---- a CLI that fails fast and kindly ----------------------------------------------------------------------------

PROBE = """
import sys, time
t0 = time.perf_counter()
from btfast.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "pyarrow", "ray") if m in sys.modules)
print(rc, time.perf_counter() - t0, ",".join(heavy) or "-")
"""


def _probe(*argv: object) -> tuple[int, float, str, str]:
    """(exit status, seconds, heavy modules imported, stderr) of `btfast <argv>` in a fresh interpreter."""
    import subprocess
    import sys

    from jobs import REPO

    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    rc, seconds, heavy = proc.stdout.split()
    return int(rc), float(seconds), heavy, proc.stderr


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, saved_models):
    """Folders a new user might pass as --model: not BridgeTower, not a model, no processor."""
    root = tmp_path_factory.mktemp("odd_models")
    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (root / "empty").mkdir()
    shutil.copytree(saved_models["itm"], root / "noproc")
    for name in ("preprocessor_config.json", "processor_config.json"):
        (root / "noproc" / name).unlink(missing_ok=True)
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        (("--shard", "5/4"), "want 0 <= i < n"),
        (("--shard", "abc"), "--shard wants i/n"),
        (("--out", "scores.txt"), "output must be .jsonl or .parquet"),
        (("--pairs", "nope.jsonl"), "--pairs nope.jsonl: no such file"),
        (("--model", "/no/such/model"), "no such folder"),
        (("--model", "{odd}/bert"), "a bert model, not BridgeTower"),
        (("--model", "{odd}/empty"), "not a model folder (no config.json"),
        (("--model", "{odd}/noproc"), "without its processor"),
        (("--image-root", "/no/such/root"), "--image-root /no/such/root: no such folder"),
        (("--batch-size", "0"), "--batch-size must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_fast_before_torch(saved_models, data, odd_models, tmp_path, change, message):
    args = {
        "--model": str(saved_models["itm"]),
        "--pairs": str(data["pairs"]),
        "--out": str(tmp_path / "o.jsonl"),
        "--image-root": str(data["imgs"]),
    }
    flag, value = change
    args[flag] = value.replace("{odd}", str(odd_models))
    rc, seconds, heavy, err = _probe("score", *[x for kv in args.items() for x in kv])
    assert rc == 2 and message in err, err
    assert heavy == "-"  # torch, transformers, pyarrow, ray never imported
    assert seconds < 10  # ~0.3 s here; generous for a loaded CI machine
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_ray_arguments_exit_2_before_ray(saved_models, data, tmp_path):
    common = ["score", "--ray", "--model", saved_models["itm"], "--pairs", data["pairs"]]
    rc, seconds, heavy, err = _probe(*common, "--out", tmp_path / "o.jsonl")
    assert rc == 2 and "with --ray the output is a folder" in err and heavy == "-", err
    rc, seconds, heavy, err = _probe(*common, "--out", tmp_path / "o", "--shard", "1/1")
    assert rc == 2 and "want 0 <= i < n" in err and heavy == "-", err


def _no_model(monkeypatch):
    """Loading a model fails the test: what is checked must be found before."""
    import btfast.score.engine

    def load_head(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(btfast.score.engine, "load_head", load_head)


def test_missing_column_is_fatal_before_the_model_loads(saved_models, data, tmp_path, monkeypatch, capsys):
    rows = [r for r in data["rows"] if r["id"][0] == "p" and r["id"][1:].isdigit()][:6]
    with open(tmp_path / "caps.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([[r["image"], r["text"]] for r in rows])
    common = ["--model", saved_models["itm"], "--pairs", tmp_path / "caps.csv", "--image-root", data["imgs"]]
    with monkeypatch.context() as m:
        _no_model(m)
        assert score(*common, "--out", tmp_path / "a.jsonl", "--workers", 0) == 1
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "columns: image, caption" in err and "--text-column" in err, err
    assert score(*common, "--out", tmp_path / "b.jsonl", "--workers", 0, "--text-column", "caption") == 0


def test_wrong_image_root_stops_before_the_model_loads(saved_models, data, tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    (tmp_path / "elsewhere").mkdir()
    rc = score(
        "--model", saved_models["itm"], "--pairs", data["pairs"], "--image-root", tmp_path / "elsewhere",
        "--out", tmp_path / "o.jsonl", "--workers", 0,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "--image-root" in err and "none of the first" in err, err


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_with_text_output_rows_carry_the_scored_text(saved_models, data, tmp_path, suffix):
    out = tmp_path / f"t.{suffix}"
    common = ["--model", saved_models["itm"], "--pairs", data["pairs"], "--image-root", data["imgs"], "--workers", 0]
    assert score(*common, "--out", out, "--with-text") == 3
    got = {r["id"]: r for r in read_out(out)}
    for r in data["rows"]:
        want = r.get("text") if isinstance(r.get("text"), str) else None
        assert got[r["id"]]["text"] == want, r
    plain = tmp_path / f"plain.{suffix}"
    assert score(*common, "--out", plain) == 3
    for a, b in zip(read_out(plain), read_out(out)):
        assert "text" not in a and {k: v for k, v in b.items() if k != "text"} == a
