"""btfast on Ray Data (`btfast.ray`, `btfast score --ray`): real Ray instances, tiny saved models, real kills.

Sized for CI's 2 cores: one local instance (`ray.init(num_cpus=2)`) shared by the `TestLocal` tests, one
simulated two-node cluster (`ray.cluster_utils.Cluster`) shared by the `TestTwoNodes` tests, each shut down
after its class; small inputs. Everything that needs Ray is skipped when `ray` is not importable; the install
hint, the pool sizing and the part store are tested without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_saved_model import sentences, write_bad_images, write_images, write_jsonl
from jobs import interrupted

from btfast.cli import main

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pyarrow") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray[data] is not installed (pip install 'btfast[ray]')")
FLOATS = ("itm_logit", "itm_prob", "itc_cosine", "itc_logit")
# the single-process reference runs: in this process, one torch thread (beside Ray's processes on 2 cores, more
# threads than cores can make OpenMP wait on itself)
SINGLE = ("--workers", 0, "--threads", 1)


def command(*argv: object) -> list[str]:
    """The argv of `btfast <argv>` for a subprocess."""
    return [sys.executable, "-m", "btfast.cli", *map(str, argv)]


def cli(*argv: object) -> int:
    """`btfast <argv>` in this process."""
    return main([str(a) for a in argv])


def read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(path).to_pylist(), key=lambda r: (r.get("kind") or "", r["row"]))


def assert_same_rows(got: list[dict], ref: list[dict], tol: float = 1e-5) -> None:
    """Same rows, same ids, statuses and errors; scores within `tol` (batches differ, so the last bits may)."""
    assert [(r["row"], r["id"]) for r in got] == [(r["row"], r["id"]) for r in ref]
    for g, r in zip(got, ref):
        assert set(g) == set(r)
        for k, v in r.items():
            if k in FLOATS and v is not None:
                assert g[k] == pytest.approx(v, abs=tol), (k, r, g)
            elif k == "embedding" and v is not None:
                assert g[k] == pytest.approx(v, abs=tol), r["row"]
            else:
                assert g[k] == v, (k, r, g)


# ---- data --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_data")
    imgs = root / "imgs"
    good = write_images(imgs, n=6)
    bad = write_bad_images(imgs)
    for name in ("huge.jpg", "banner.png", "tall.png"):  # slow to decode, and covered by test_score
        (imgs / name).unlink()
        bad.pop(name)
    texts = sentences(8, seed=3)
    rows = []
    for name in good:
        for t in texts[:4]:
            rows.append({"image": name, "text": t, "id": f"p{len(rows)}"})
    for name in bad:
        rows.append({"image": name, "text": texts[5], "id": f"bad-{name}"})
    rows += [
        {"image": "nope.jpg", "text": "a dog", "id": "missing"},
        {"image": good[0], "text": "", "id": "empty-text"},
        {"image": good[1], "text": "a red car on the street " * 30, "id": "long-text"},
        {"text": "no image field", "id": "no-image"},
        {"image": good[0], "text": 42, "id": "number-text"},
        {"image": "../outside.png", "text": "a dog", "id": "escape"},
    ]
    pairs = write_jsonl(root / "pairs.jsonl", rows)
    with open(pairs, "a", encoding="utf-8") as f:
        f.write('{"image": "img000.png", "text": broken json\n')
    (root / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    big_rows = [{"image": good[i % len(good)], "text": t, "id": i} for i, t in enumerate(sentences(1200, seed=11))]
    big_rows[17] = {"image": "corrupt.jpg", "text": "x", "id": 17}
    big = write_jsonl(root / "big.jsonl", big_rows)
    return {
        "root": root,
        "imgs": imgs,
        "pairs": pairs,
        "rows": rows,
        "good": good,
        "bad": bad,
        "texts": root / "texts.txt",
        "big": big,
        "n_big": len(big_rows),
    }


@pytest.fixture(scope="module")
def big_ref(saved_models, data, tmp_path_factory):
    """The single-process scorer's output for the big input (the reference for the kill tests)."""
    out = tmp_path_factory.mktemp("ray_ref") / "big.parquet"
    assert (
        main(
            [
                "score",
                "--no-progress",
                "--model",
                str(saved_models["itm"]),
                "--pairs",
                str(data["big"]),
                "--image-root",
                str(data["imgs"]),
                "--out",
                str(out),
                *map(str, SINGLE),
            ]
        )
        == 3
    )
    return read_rows(out)


def big_args(saved_models, data, out: Path, *extra: object) -> list[str]:
    return [
        "score",
        "--ray",
        "--no-progress",
        "--model",
        str(saved_models["itm"]),
        "--pairs",
        str(data["big"]),
        "--image-root",
        str(data["imgs"]),
        "--out",
        str(out),
        "--chunk-rows",
        "8",
        "--chunk-images",
        "1",
        "--batch-size",  # small model calls: the run lasts long enough to be killed in the middle
        "1",
        *map(str, extra),
    ]


# ---- without Ray -------------------------------------------------------------------------------------------------


def test_ray_flag_without_ray_says_how_to_install(saved_models, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as when it is not installed
    for argv in (["score", "--pairs", data["pairs"]], ["embed", "--texts", data["texts"]]):
        rc = cli(*argv, "--ray", "--model", saved_models["itm"], "--out", tmp_path / "o")
        err = capsys.readouterr().err
        assert rc == 1 and "pip install 'btfast[ray]'" in err, err
    assert not (tmp_path / "o").exists()


def test_placement_leaves_cpus_for_decoding():
    from btfast.ray.stages import place

    p = place({"CPU": 2})  # the case that stalls when the pool takes every CPU
    assert (p.device, p.actors, p.actor_cpus, p.threads) == ("cpu", 1, 1, 1)
    p = place({"CPU": 2}, workers=2)
    assert p.actors == 2 and p.actors * p.actor_cpus <= 1
    p = place({"CPU": 16})
    assert (p.actors, p.actor_cpus, p.threads) == (4, 2, 2)
    p = place({"CPU": 64, "GPU": 8})
    assert (p.device, p.actors, p.actor_gpus, p.actor_cpus) == ("cuda", 8, 1, 1)
    assert place({"CPU": 64, "GPU": 8}, gpus_per_worker=0.5).actors == 16
    assert place({"CPU": 64, "GPU": 8}, gpus_per_worker=2).actors == 4
    p = place({"CPU": 4, "GPU": 4})  # few CPUs: actors reserve less, decoding keeps one
    assert p.actors == 4 and p.actors * p.actor_cpus <= 3
    assert place({"CPU": 8, "GPU": 2}, device="cpu").device == "cpu"
    for kw, msg in (
        ({"device": "cuda"}, "no GPUs"),
        ({"workers": 0}, "--workers"),
        ({"gpus_per_worker": 1}, "--gpus-per-worker"),
    ):
        with pytest.raises(ValueError, match=msg):
            place({"CPU": 4}, **kw)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_part_store_is_atomic_resumable_and_exclusive(tmp_path):
    import pyarrow as pa

    from btfast.ray.cli import Assembler
    from btfast.score.parts import PartStore
    from btfast.score.sink import ResumeError

    def table(part, rows, bad=()):
        return pa.table(
            {"row": rows, "status": ["error" if r in bad else "ok" for r in rows], "part": [part] * len(rows)}
        )

    out = tmp_path / "out"
    header = {"command": "score --ray", "model": "m"}
    asm = Assembler({0: 3, 1: 2})
    got = list(asm.add(table(0, [2, 0])))
    assert got == []
    got = list(asm.add(pa.concat_tables([table(1, [4, 3], bad=(4,)), table(0, [0, 1])])))  # row 0 twice
    got = dict(got)
    assert sorted(got) == [0, 1] and asm.duplicates == 1 and asm.pending == 0
    assert got[0].column("row").to_pylist() == [0, 1, 2] and "part" not in got[0].column_names
    with PartStore(out, header) as store:
        with pytest.raises(ResumeError, match="another btfast run"):
            PartStore(out, header)
        for k, t in got.items():
            store.write(k, t)
    (out / ".part-00000007.parquet.tmp").write_bytes(b"half a part")  # a write cut by a kill
    with PartStore(out, header) as store:
        assert store.done == {0: {"rows": 3, "errors": 0}, 1: {"rows": 2, "errors": 1}}
        assert not (out / ".part-00000007.parquet.tmp").exists()
        store.finish([0, 1])
    assert (out / "_SUCCESS").exists() and json.loads((out / "_btfast_job.json").read_text())["finished"]
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(out).column("row").to_pylist()) == [0, 1, 2, 3, 4]  # the folder reads as one table
    with pytest.raises(ResumeError, match="different job"):
        PartStore(out, {**header, "model": "other"})
    with PartStore(out, {**header, "model": "other"}, overwrite=True) as store:
        assert store.done == {} and not (out / "_SUCCESS").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ResumeError, match="did not write"):
        PartStore(tmp_path / "mine", header, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_stages_without_ray_ship_each_canvas_once(saved_models, data):
    """The two stages as plain functions: embeddings equal `embed_chunk`'s; a canvas travels on the first row of
    its image only, a later batch reuses the actor's copy, and an actor that never saw it decodes it again."""
    import pyarrow as pa
    import torch

    from btfast.preprocess import ImagePreprocessor, TextPreprocessor
    from btfast.ray.stages import ModelWorker, decode_batch
    from btfast.score.config import JobConfig
    from btfast.score.engine import Context, embed_chunk, load_head
    from btfast.score.rows import ImageResolver, Row

    model = str(saved_models["itc"])
    pre = ImagePreprocessor.from_pretrained(model)
    names = [*data["good"], "corrupt.jpg", data["good"][0], data["good"][1]]
    blobs = [(data["imgs"] / n).read_bytes() for n in names]
    dec = decode_batch(pa.table({"image": blobs, "id": names}), pre=pre, kind="image")
    assert dec.column("_canvas").null_count == 3  # the corrupt image and the two repeats carry no canvas
    assert dec.column("_bytes").null_count == len(names) - 2  # ... the repeats carry their source instead
    cfg = JobConfig(command="embed", model=model, out="", head="itc")
    worker = ModelWorker(cfg, "embed", "cpu", "fp32", 4)
    got = worker(dec).to_pylist()
    ctx = Context(
        load_head(model, "itc", torch.device("cpu"), torch.float32), "itc", pre, TextPreprocessor.from_pretrained(model)
    )
    rows = []
    for n, b in zip(names, blobs):
        r = Row(row=None, id=n, kind="image")
        r.image, r.image_key, r.image_name = ImageResolver(None)(b)
        rows.append(r)
    ref = embed_chunk(ctx, rows, {r.image_key: pre.load_or_reason(r.image) for r in rows})
    for g, r in zip(got, ref):
        assert (g["id"], g["image"], g["status"], g["error"]) == (r["id"], r["image"], r["status"], r["error"])
        assert r["embedding"] is None or g["embedding"] == pytest.approx(r["embedding"], abs=1e-5)
    assert got[len(data["good"])]["error"].startswith("image:")
    repeats = dec.slice(len(names) - 2)
    expect = np.array([g["embedding"] for g in got[-2:]])
    np.testing.assert_allclose(worker(repeats).column("embedding").to_pylist(), expect, atol=1e-6)
    assert worker.redecoded == 0  # from the actor's cache
    fresh = ModelWorker(cfg, "embed", "cpu", "fp32", 4)
    np.testing.assert_allclose(fresh(repeats).column("embedding").to_pylist(), expect, atol=1e-6)
    assert fresh.redecoded == 2
    texts = decode_batch(pa.table({"text": ["a dog", "", "a red car"]}), pre=pre, kind="text")
    out = worker(texts).to_pylist()
    assert [o["status"] for o in out] == ["ok", "error", "ok"] and out[1]["error"] == "text: empty"


# ---- one local Ray instance --------------------------------------------------------------------------------------


@needs_ray
class TestLocal:
    @pytest.fixture(scope="class", autouse=True)
    def ray_local(self, big_ref):  # (the reference first: a single-process run beside Ray's processes is slower)
        import logging

        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()

    def test_api_score_equals_single_process_scorer(self, saved_models, data):
        import ray

        import btfast.ray
        from btfast.score.engine import Scorer

        records = []
        for i, r in enumerate(data["rows"]):
            if not isinstance(r.get("text", ""), str):
                continue  # (a number where a text should be cannot share an Arrow column with strings)
            rec = {"id": r["id"], "text": r.get("text"), "row": i, "src": f"s{i}", "image": None}
            if "image" in r:  # every other image as bytes: {"bytes", "path"} as Hugging Face datasets store them
                by_bytes = i % 2 == 0 and (data["imgs"] / r["image"]).is_file()
                rec["image"] = (
                    {"bytes": (data["imgs"] / r["image"]).read_bytes(), "path": None}
                    if by_bytes
                    else {"bytes": None, "path": r["image"]}
                )
            records.append(rec)
        ds = ray.data.from_items(records)
        out = btfast.ray.score(ds, saved_models["itm"], image_root=data["imgs"], keep=["src"], batch_size=4)
        got = {r["id"]: r for r in out.take_all()}
        ref = Scorer(saved_models["itm"], image_root=data["imgs"], device="cpu")(records)
        assert len(got) == len(ref) == len(records)
        for r, rec in zip(ref, records):
            g = got[r["id"]]
            assert (g["row"], g["src"]) == (rec["row"], rec["src"])
            for k in ("image", "status", "error", "text_truncated"):
                assert g[k] == r[k], (k, r, g)
            for k in ("itm_logit", "itm_prob"):
                assert (g[k] is None) == (r[k] is None) and (r[k] is None or g[k] == pytest.approx(r[k], abs=1e-5))
        assert got["long-text"]["text_truncated"] and got["missing"]["error"].startswith("image: missing file")
        assert "leaves --image-root" in got["escape"]["error"] and got["no-image"]["status"] == "error"
        assert sum(g["status"] == "ok" for g in got.values()) >= 24
        assert any(g["image"].startswith("sha1:") and g["status"] == "ok" for g in got.values())
        with pytest.raises(ValueError, match="kind="):
            btfast.ray.embed(ds, saved_models["itc"])  # images and texts: say which to embed
        with pytest.raises(ValueError, match="no column 'nope'"):
            btfast.ray.score(ds, saved_models["itm"], keep=["nope"])

    def test_cli_score_itc_equals_btfast_score(self, saved_models, data, tmp_path, capsys):
        common = [
            "--model",
            saved_models["itc"],
            "--head",
            "itc",
            "--with-text",
            "--pairs",
            data["pairs"],
            "--image-root",
            data["imgs"],
            "--no-progress",
            "--chunk-rows",
            7,
            "--chunk-images",
            2,
        ]
        assert cli("score", *common, "--out", tmp_path / "ref.parquet", *SINGLE) == 3
        out = tmp_path / "ray_out"
        assert cli("score", *common, "--out", out, "--ray") == 3
        assert "rows (" in capsys.readouterr().err
        ref = read_rows(tmp_path / "ref.parquet")
        assert_same_rows(read_rows(out), ref)
        job = json.loads((out / "_btfast_job.json").read_text())
        assert job["finished"] and job["rows"] == len(ref) and (out / "_SUCCESS").exists()
        assert len(list(out.glob("part-*.parquet"))) == job["parts"] > 5
        # a finished job reruns as a no-op; another job in the same folder is refused
        stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        assert cli("score", *common, "--out", out, "--ray") == 3
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
        assert cli("score", *common[:-1], 3, "--out", out, "--ray") == 1
        assert "different job" in capsys.readouterr().err

    def test_cli_embed_equals_btfast_embed(self, saved_models, data, tmp_path):
        common = [
            "--model",
            saved_models["itc"],
            "--images",
            data["imgs"],
            "--texts",
            data["texts"],
            "--no-progress",
            "--chunk-rows",
            4,
        ]
        rc = cli("embed", *common, "--out", tmp_path / "ref.parquet", *SINGLE)
        assert cli("embed", *common, "--out", tmp_path / "ray_out", "--ray") == rc == 3
        got, ref = read_rows(tmp_path / "ray_out"), read_rows(tmp_path / "ref.parquet")
        assert_same_rows(got, ref)
        assert {r["kind"] for r in got} == {"image", "text"}
        ok = [r for r in got if r["status"] == "ok"]
        assert all(math.isclose(sum(x * x for x in r["embedding"]), 1.0, rel_tol=1e-4) for r in ok)

    def test_actor_killed_mid_run_loses_and_repeats_nothing(self, saved_models, data, big_ref, tmp_path, monkeypatch):
        import ray

        from btfast.score.parts import PartStore

        # The driver holds still after its second part until the actor is dead: the kill lands mid-run on any machine.
        write, two_written, release = PartStore.write, threading.Event(), threading.Event()

        def gated(store, k, table):
            rec = write(store, k, table)
            if len(store.done) == 2:
                two_written.set()
                release.wait(timeout=120)
            return rec

        monkeypatch.setattr(PartStore, "write", gated)
        out = tmp_path / "killed_actor"
        result: dict = {}
        run = threading.Thread(target=lambda: result.setdefault("rc", cli(*big_args(saved_models, data, out))))
        run.start()
        try:
            assert two_written.wait(timeout=300), "no two parts written"
            job = ray.get_runtime_context().get_job_id()
            workers = [
                a
                for a in ray._private.state.actors().values()
                if "ModelWorker" in (a.get("ActorClassName") or "") and a["State"] == "ALIVE" and a["JobID"] == job
            ]
            assert len(workers) == 1, "the model actor is gone before it could be killed"
            pid = workers[0]["Pid"]
            deadline = time.time() + 10
            while time.time() < deadline and _state(pid) != "R":  # running: computing a batch, not waiting for one
                time.sleep(0.001)
            os.kill(pid, signal.SIGKILL)
            killed_at = len(list(out.glob("part-*.parquet")))
        finally:
            release.set()
            run.join(timeout=300)
        assert not run.is_alive()
        assert killed_at == 2  # the kill came with 2 of the 150 parts written
        after = ray._private.state.actors()[workers[0]["ActorID"]]
        assert after["NumRestarts"] >= 1  # Ray restarted the actor and retried its batch
        assert result["rc"] == 3
        got = read_rows(out)
        assert [r["row"] for r in got] == list(range(data["n_big"]))  # every row exactly once
        assert_same_rows(got, big_ref)

    def test_driver_killed_then_same_command_resumes(self, ray_local, saved_models, data, big_ref, tmp_path, capsys):
        out = tmp_path / "killed_driver"
        # the driver stops itself once its first part is durable; kill -9 from here
        interrupted(command(*big_args(saved_models, data, out, "--address", ray_local)), chunks=1, how="STOP")
        done = len(list(out.glob("part-*.parquet")))
        assert not (out / "_SUCCESS").exists() and done == 1
        assert cli(*big_args(saved_models, data, out, "--address", ray_local)) == 3  # the same command
        assert "resumed from an earlier run" in capsys.readouterr().err
        got = read_rows(out)
        assert [r["row"] for r in got] == list(range(data["n_big"]))  # every row exactly once
        assert_same_rows(got, big_ref)

    def test_readme_ray_snippet(self, saved_models, data, tmp_path):
        import pyarrow as pa
        import pyarrow.parquet as pq
        from test_readme import run_snippet, snippets

        (code,) = [code for _, code in snippets() if "import ray" in code]
        (tmp_path / "pairs").mkdir()
        rows = [{"image": str(data["imgs"] / r["image"]), "text": r["text"]} for r in data["rows"][:6]]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs" / "part-0.parquet")
        got = run_snippet(code, saved_models, tmp_path)["scores"].take_all()
        assert len(got) == 6 and all(g["status"] == "ok" for g in got)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


# ---- a two-node cluster on one machine ---------------------------------------------------------------------------


@needs_ray
class TestTwoNodes:
    @pytest.fixture(scope="class")
    def cluster(self):
        import logging

        import ray
        from ray.cluster_utils import Cluster

        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        c.add_node(num_cpus=2)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()

    def test_two_actors_on_two_nodes_equal_btfast_score(self, cluster, saved_models, data, tmp_path):
        import ray

        common = [
            "--model",
            saved_models["itm"],
            "--pairs",
            data["pairs"],
            "--image-root",
            data["imgs"],
            "--no-progress",
            "--chunk-rows",
            5,
        ]
        assert cli("score", *common, "--out", tmp_path / "ref.parquet", *SINGLE) == 3
        out = tmp_path / "two_nodes"
        assert (
            cli(
                "score", *common, "--out", out, "--ray", "--address", cluster.address, "--workers", 2, "--batch-size", 4
            )
            == 3
        )
        assert_same_rows(read_rows(out), read_rows(tmp_path / "ref.parquet"))
        job = ray.get_runtime_context().get_job_id()
        nodes = {
            a["Address"]["NodeID"]
            for a in ray._private.state.actors().values()
            if "ModelWorker" in (a.get("ActorClassName") or "") and a["JobID"] == job
        }
        assert len(nodes) == 2  # one model actor on each node

    def test_two_nodes_read_tar_shards(self, cluster, saved_models, tmp_path):
        """A WebDataset collection on the two-node cluster: parts are the shards, rows equal `btfast score --shards`."""
        import pyarrow.parquet as pq
        from fixtures_shards import write_collection

        written = write_collection(str(tmp_path / "c"), shards=6, per_shard=3)
        common = ["--model", saved_models["itm"], "--shards", tmp_path / "c", "--no-progress"]
        assert cli("score", *common, "--out", tmp_path / "ref.parquet", *SINGLE) == 0
        out = tmp_path / "two_nodes"
        ray_args = ["--ray", "--address", cluster.address, "--workers", 2, "--batch-size", 4]
        assert cli("score", *common, "--out", out, *ray_args) == 0
        assert sorted(p.name for p in out.glob("part-*")) == [f"part-{k:08d}.parquet" for k in range(6)]

        def by_id(path: Path) -> list[dict]:
            return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["id"])

        assert [r["id"] for r in by_id(out)] == sorted(w["key"] for w in written)
        assert_same_rows(by_id(out), by_id(tmp_path / "ref.parquet"))
