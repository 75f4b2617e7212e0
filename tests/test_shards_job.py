"""`btfast score|embed|retrieve --shards`: WebDataset collections (written by `webdataset.TarWriter`) read from a
local S3 server (moto, through s3fs over HTTP) and from disk, output to a folder URL on that server, resumed per
shard after kill -9, divided by shard files, and equal to the loose-file run of the same pairs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fixtures_shards import tar_bytes, write_collection
from jobs import REPO, interrupted

from btfast.cli import main
from btfast.io import fs

SHARDS = 20
PER_SHARD = 3
FLOATS = ("itm_logit", "itm_prob")
QUIET = ["--workers", "0", "--threads", "1", "--no-progress"]


def _bad_shard(written: list[dict]) -> bytes:
    """Shard 00005 as img2dataset might leave it: a corrupt JPEG and a sample whose caption is missing."""
    a, b, c = (w for w in written if w["shard"] == 5)
    return tar_bytes(
        [
            {"__key__": a["key"], "jpg": b"\xff\xd8\xff\xe0 not really a jpeg" * 8, "txt": a["caption"]},
            {"__key__": b["key"], "jpg": b["jpg"]},
            {"__key__": c["key"], "jpg": c["jpg"], "txt": c["caption"]},
        ]
    )


@pytest.fixture(scope="module")
def collection(s3_endpoint, tmp_path_factory):
    """20 shards of 3 samples on the S3 server (shard 5 with a corrupt image and a sample without text), and the
    same pairs as loose files: `loose/00005.tar/000050000.jpg` + `pairs.jsonl` (so the `image` column is equal)."""
    import fsspec

    fsspec.filesystem("s3").mkdir("btfast-collection")
    url = "s3://btfast-collection/c"
    written = write_collection(url, shards=SHARDS, per_shard=PER_SHARD)
    bad = _bad_shard(written)
    with fs.open_file(f"{url}/00005.tar", "wb") as f:
        f.write(bad)
    loose = tmp_path_factory.mktemp("loose")
    pairs = []
    from btfast.io.tar import read_shard

    for k in range(SHARDS):
        for s in read_shard(fs.read_bytes(f"{url}/{k:05d}.tar")).samples:
            name = f"{k:05d}.tar/{s.image_member}"
            (loose / name).parent.mkdir(exist_ok=True)
            (loose / name).write_bytes(s.image)
            pairs.append({"image": name, "id": s.key, **({"text": s.text} if s.text is not None else {})})
    with open(loose / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return {"url": url, "pattern": f"{url}/{{00000..{SHARDS - 1:05d}}}.tar", "loose": loose, "written": written}


def _parts(url: str) -> list[str]:
    return sorted(n for n in fs.listdir(url) if fs.basename(n).startswith("part-"))


def _read_folder(url: str) -> list[dict]:
    """The rows of a folder of Parquet parts (a path or a URL), part by part."""
    import pyarrow.parquet as pq

    rows = []
    for name in _parts(url):
        with fs.open_file(name, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def _by_id(rows: list[dict]) -> dict[str, dict]:
    out = {r["id"]: r for r in rows}
    assert len(out) == len(rows), "an id twice"
    return out


def _assert_same(got: dict[str, dict], ref: dict[str, dict], tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(ref)
    for k, r in ref.items():
        g = got[k]
        assert (g["image"], g["status"]) == (r["image"], r["status"]), (g, r)
        for f in FLOATS:
            assert (g[f] is None) == (r[f] is None) and (g[f] is None or abs(g[f] - r[f]) <= tol), (f, g, r)


@pytest.fixture(scope="module")
def reference(saved_models, collection, tmp_path_factory):
    """The loose-file run of the same pairs (in this process)."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    loose = collection["loose"]
    rc = main(
        ["score", "--model", str(saved_models["itm"]), "--pairs", str(loose / "pairs.jsonl"), "--out", str(out), *QUIET]
    )
    assert rc == 3  # the corrupt image and the missing text
    with open(out) as f:
        return _by_id([json.loads(line) for line in f])


def test_score_shards_on_s3_equals_the_loose_run(saved_models, collection, reference, s3_bucket, capsys):
    out = f"{s3_bucket}/scores"
    argv = ["score", "--model", str(saved_models["itm"]), "--shards", collection["pattern"], "--out", out, *QUIET]
    assert main(argv) == 3
    rows = _read_folder(out)
    assert len(_parts(out)) == SHARDS  # one part per shard
    got = _by_id(rows)
    _assert_same(got, reference)
    bad = {k: got[k]["error"] for k in got if got[k]["status"] != "ok"}
    assert sorted(bad) == ["000050000", "000050001"]
    assert bad["000050000"].startswith("image: ") and bad["000050001"] == "text: no txt member in sample"
    job = json.loads(fs.read_bytes(f"{out}/_btfast_job.json"))
    assert job["finished"] and job["rows"] == SHARDS * PER_SHARD and job["header"]["shards"] == collection["pattern"]
    assert fs.exists(f"{out}/_SUCCESS")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(job)  # credentials stay in the environment
    assert main(argv) == 3  # a rerun of a finished job does nothing and reports the same
    assert "0 new" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["KILL", "STOP"])  # the job's own SIGKILL, and a real kill -9 from outside
def test_kill9_on_s3_then_rerun_gives_every_sample_once(saved_models, collection, reference, s3_bucket, how):
    out = f"{s3_bucket}/scores"
    argv = [sys.executable, "-m", "btfast.cli", "score", "--model", str(saved_models["itm"])]
    argv += ["--shards", collection["url"], "--out", out, *QUIET]
    interrupted(argv, chunks=7, how=how)
    assert len(_parts(out)) == 7 and not fs.exists(f"{out}/_SUCCESS")
    done = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "resumed" in done.stderr
    _assert_same(_by_id(_read_folder(out)), reference)


def test_real_kill9_mid_shard_then_rerun(saved_models, collection, reference, tmp_path):
    """A kill -9 at a moment the test does not choose (while shards are being written) to a local JSONL output."""
    out = tmp_path / "scores.jsonl"
    argv = [sys.executable, "-m", "btfast.cli", "score", "--model", str(saved_models["itm"])]
    argv += ["--shards", collection["pattern"], "--out", str(out), *QUIET]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out.with_name(out.name + ".btfast-progress")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_text().count('"chunk"') >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-3000:]
    with open(out) as f:
        _assert_same(_by_id([json.loads(line) for line in f]), reference)


def test_shard_i_of_n_divides_by_shard_files(saved_models, collection, reference, tmp_path):
    got = {}
    for i in range(3):
        out = tmp_path / f"s{i}.jsonl"
        argv = ["score", "--model", str(saved_models["itm"]), "--shards", collection["url"], "--out", str(out)]
        assert main([*argv, "--shard", f"{i}/3", *QUIET]) in (0, 3)
        with open(out) as f:
            rows = [json.loads(line) for line in f]
        assert {r["image"].split("/")[0] for r in rows} == {f"{k:05d}.tar" for k in range(i, SHARDS, 3)}
        got.update(_by_id(rows))
    _assert_same(got, reference)


def test_truncated_and_unreadable_shards(saved_models, tmp_path, capsys):
    written = write_collection(str(tmp_path / "c"), shards=3, per_shard=3)
    data = (tmp_path / "c" / "00001.tar").read_bytes()
    (tmp_path / "c" / "00001.tar").write_bytes(data[: data.index(written[4]["jpg"]) + 10])  # cut in sample 2's image
    (tmp_path / "c" / "00002.tar").rename(tmp_path / "00002.tar")  # gone for now
    out = tmp_path / "out.jsonl"
    argv = ["score", "--model", str(saved_models["itm"]), "--shards", str(tmp_path / "c" / "{00000..00002}.tar")]
    argv += ["--out", str(out), *QUIET]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "00001.tar is truncated" in err and "1 shard(s) could not be read" in err and "00002.tar" in err
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == [w["key"] for w in written[:5]]  # shard 0, then shard 1's readable samples
    assert rows[4]["status"] == "error" and "truncated" in rows[4]["error"]
    (tmp_path / "00002.tar").rename(tmp_path / "c" / "00002.tar")
    assert main(argv) == 3  # the missing shard is read now; the truncated one is not read again
    with open(out) as f:
        assert [json.loads(line)["id"] for line in f] == [w["key"] for w in written[:5] + written[6:]]


@pytest.mark.parametrize("what", ["both", "images", "texts"])
def test_embed_shards(saved_models, tmp_path, what):
    import pyarrow.parquet as pq

    written = write_collection(str(tmp_path / "c"), shards=2, per_shard=3)
    out = tmp_path / "emb.parquet"
    argv = ["embed", "--model", str(saved_models["itc"]), "--shards", str(tmp_path / "c"), "--embed", what]
    assert main([*argv, "--out", str(out), *QUIET]) == 0
    rows = pq.read_table(out).to_pylist()
    kinds = {"both": ["image", "text"], "images": ["image"], "texts": ["text"]}[what]
    assert [(r["id"], r["kind"]) for r in rows] == [(w["key"], k) for w in written for k in kinds]
    assert all(r["status"] == "ok" and len(r["embedding"]) > 0 for r in rows)
    for r in rows:
        assert (r["text"] is not None) == (r["kind"] == "text")


def test_retrieve_shards_equals_loose_lists(saved_models, tmp_path):
    written = write_collection(str(tmp_path / "c"), shards=2, per_shard=3)
    (tmp_path / "imgs").mkdir()
    for w in written:
        (tmp_path / "imgs" / f"{w['key']}.jpg").write_bytes(w["jpg"])
    (tmp_path / "texts.txt").write_text("".join(w["caption"] + "\n" for w in written))
    common = ["--model", str(saved_models["itm"]), "--itc-model", str(saved_models["itc"]), "--top-k", "3", *QUIET]
    assert main(["retrieve", *common, "--shards", str(tmp_path / "c"), "--out", str(tmp_path / "s.jsonl")]) == 0
    loose = ["--images", str(tmp_path / "imgs"), "--texts", str(tmp_path / "texts.txt")]
    assert main(["retrieve", *common, *loose, "--out", str(tmp_path / "l.jsonl")]) == 0
    got, ref = ([json.loads(x) for x in open(tmp_path / n)] for n in ("s.jsonl", "l.jsonl"))
    assert len(got) == len(ref) == 2 * len(written)
    for g, r in zip(got, ref):
        assert (g["direction"], g["query_row"], g["status"]) == (r["direction"], r["query_row"], r["status"])
        assert [x["row"] for x in g["results"]] == [x["row"] for x in r["results"]]
        assert [x["itm_logit"] for x in g["results"]] == pytest.approx([x["itm_logit"] for x in r["results"]], abs=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="Ray tests run on Linux")
def test_ray_score_shards_on_s3_equals_the_loose_run(saved_models, collection, reference, s3_bucket):
    pytest.importorskip("ray")
    out = f"{s3_bucket}/ray"
    argv = ["score", "--model", str(saved_models["itm"]), "--shards", collection["pattern"], "--out", out]
    argv += ["--ray", "--workers", "1", "--batch-size", "4", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "btfast.cli", *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-3000:]
    assert len(_parts(out)) == SHARDS
    _assert_same(_by_id(_read_folder(out)), reference)
    # a kill -9 of the driver after 5 shards, then the same command: every sample once
    out2 = f"{s3_bucket}/ray2"
    argv2 = [a if a != out else out2 for a in argv]
    interrupted([sys.executable, "-m", "btfast.cli", *argv2], chunks=5)
    assert len(_parts(out2)) == 5
    done = subprocess.run([sys.executable, "-m", "btfast.cli", *argv2], env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-3000:]
    _assert_same(_by_id(_read_folder(out2)), reference)


@pytest.mark.parametrize("root", [False, True])
def test_pairs_and_images_on_s3_equal_the_local_run(saved_models, collection, reference, s3_bucket, tmp_path, root):
    """A pairs file and its images on the object store (relative names under the pairs file's folder URL, or under
    --image-root given as a URL) score as the same files on disk."""
    loose = collection["loose"]
    for f in loose.rglob("*"):
        if f.is_file():
            with fs.open_file(f"{s3_bucket}/loose/{f.relative_to(loose)}", "wb") as out:
                out.write(f.read_bytes())
    argv = ["score", "--model", str(saved_models["itm"]), "--pairs", f"{s3_bucket}/loose/pairs.jsonl"]
    argv += ["--image-root", f"{s3_bucket}/loose"] if root else []
    assert main([*argv, "--out", str(tmp_path / "o.jsonl"), *QUIET]) == 3
    with open(tmp_path / "o.jsonl") as f:
        _assert_same(_by_id([json.loads(line) for line in f]), reference)


@pytest.mark.parametrize(
    "root, base, name, want",
    [
        ("s3://b/imgs", None, "x/1.jpg", "s3://b/imgs/x/1.jpg"),
        ("s3://b/imgs", None, "x/../1.jpg", "s3://b/imgs/1.jpg"),
        ("s3://b/imgs", None, "../secret.jpg", "leaves --image-root"),
        ("s3://b/imgs", None, "s3://other/1.jpg", "leaves --image-root"),
        (None, "s3://b/lists", "../imgs/1.jpg", "s3://b/imgs/1.jpg"),
        (None, "s3://b/lists", "gs://c/2.jpg", "gs://c/2.jpg"),
        (None, "/data", "memory:///m/3.png", "memory:///m/3.png"),
    ],
)
def test_image_names_under_url_roots(root, base, name, want):
    from btfast.score.rows import ImageResolver

    resolver = ImageResolver(root, base)
    if "://" in want:
        assert resolver(name)[:2] == (want, want)
    else:
        with pytest.raises(ValueError, match=want):
            resolver(name)


def test_bad_arguments_exit_2(saved_models, tmp_path, capsys):
    m = str(saved_models["itm"])
    for argv, msg in (
        (["score", "--model", m, "--out", "x.jsonl"], "give --pairs FILE or --shards"),
        (["score", "--model", m, "--shards", "a/", "--pairs", "p.jsonl", "--out", "x.jsonl"], "leave out --pairs"),
        (["score", "--model", m, "--shards", "a/", "--out", "s3://b/x.jsonl"], "cannot be appended"),
        (["embed", "--model", m, "--images", "a/{0..1}.tar", "--texts", "t.txt", "--out", "x.jsonl"], "one collection"),
    ):
        assert main(argv) == 2
        assert msg in capsys.readouterr().err


def test_a_truncated_shard_alone_makes_exit_status_3(saved_models, tmp_path, capsys):
    """Cut at a member boundary: every sample read is whole (no error row), yet the run does not pass as clean."""
    write_collection(str(tmp_path / "c"), shards=2, per_shard=3)
    import tarfile

    with tarfile.open(tmp_path / "c" / "00001.tar") as t:
        cut = next(m.offset for m in t.getmembers() if m.name.startswith("000010002."))  # sample 2's first header
    (tmp_path / "c" / "00001.tar").write_bytes((tmp_path / "c" / "00001.tar").read_bytes()[:cut])
    argv = ["score", "--model", str(saved_models["itm"]), "--shards", str(tmp_path / "c"), *QUIET]
    assert main([*argv, "--out", str(tmp_path / "o.jsonl")]) == 3
    err = capsys.readouterr().err
    assert "00001.tar is truncated" in err and "shards truncated 1" in err and "errors)" in err
    with open(tmp_path / "o.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["status"] for r in rows] == ["ok"] * 5  # shard 0's 3 samples and shard 1's first 2, whole


def test_resume_header_names_urls_without_credentials(saved_models):
    from btfast.score.config import JobConfig

    cfg = JobConfig(
        command="score",
        model=str(saved_models["itm"]),
        out="s3://bucket/out?X-Amz-Signature=sig123",
        shards="s3://AKIAKEY:secret123@bucket/c/{00000..00001}.tar",
    )
    text = json.dumps(cfg.header())
    assert "secret123" not in text and "AKIAKEY" not in text and "sig123" not in text
    assert cfg.header()["shards"] == "s3://REDACTED@bucket/c/{00000..00001}.tar"


@pytest.mark.parametrize(
    "flags, kinds", [(["--images"], ["image"]), (["--texts"], ["text"]), (["--images", "--texts"], ["image", "text"])]
)
def test_embed_images_or_texts_naming_tar_shards(saved_models, tmp_path, flags, kinds):
    written = write_collection(str(tmp_path / "c"), shards=2, per_shard=2)
    spec = str(tmp_path / "c" / "{00000..00001}.tar")
    argv = ["embed", "--model", str(saved_models["itc"]), "--out", str(tmp_path / "e.jsonl"), *QUIET]
    for f in flags:
        argv += [f, spec]
    assert main(argv) == 0
    with open(tmp_path / "e.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["id"], r["kind"]) for r in rows] == [(w["key"], k) for w in written for k in kinds]
