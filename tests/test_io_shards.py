"""WebDataset shards and fsspec URLs (btfast.io): listing, sample grouping, bad members, truncation, read-ahead,
and the same collection read from a folder, from memory:// and from a local S3 server."""

from __future__ import annotations

import io
import tarfile
import threading

import pytest
from fixtures_shards import sample_key, tar_bytes, write_collection

from btfast.io import fs
from btfast.io.prefetch import read_ahead
from btfast.io.shards import expand_braces, is_shard_spec, list_shards
from btfast.io.tar import read_shard


# ---- names -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("s/{00000..00002}.tar", ["s/00000.tar", "s/00001.tar", "s/00002.tar"]),
        ("s/{8..10}.tar", ["s/8.tar", "s/9.tar", "s/10.tar"]),
        ("s/{008..010}.tar", ["s/008.tar", "s/009.tar", "s/010.tar"]),
        ("s/{2..0}.tar", ["s/2.tar", "s/1.tar", "s/0.tar"]),
        ("{a,b}-{0..1}.tar", ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]),
        ("s3://bk/x{y}.tar", ["s3://bk/x{y}.tar"]),
        ("plain.tar", ["plain.tar"]),
    ],
)
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize(
    "spec, shards", [("a/{0..3}.tar", True), ("x.TAR", True), ("s3://b/*.tar", True), ("pairs.jsonl", False)]
)
def test_is_shard_spec(spec, shards):
    assert is_shard_spec(spec) is shards


@pytest.mark.parametrize(
    "url, shown",
    [
        ("s3://AKIAKEY:secret@bucket/a.tar", "s3://REDACTED@bucket/a.tar"),
        ("https://h/a.tar?X-Amz-Signature=abc&versionId=3", "https://h/a.tar?X-Amz-Signature=REDACTED&versionId=3"),
        ("https://h/a.tar?token=abc", "https://h/a.tar?token=REDACTED"),
        ("gs://bucket/dir/a.tar", "gs://bucket/dir/a.tar"),
    ],
)
def test_display_hides_credentials(url, shown):
    assert fs.display(url) == shown


def test_display_names_a_local_file_one_way(tmp_path):
    p = tmp_path / "a.tar"
    assert fs.display(f"file://{p}") == fs.display(str(p)) == str(p)
    assert fs.display("rel/a.tar").endswith("/rel/a.tar") and fs.display("rel/a.tar").startswith("/")


# ---- listing a collection: folder, pattern, glob, list file; path, file:// and memory:// ----------------------
def _collection(kind, tmp_path, request):
    if kind == "path":
        return str(tmp_path / "c")
    if kind == "file-url":
        return f"file://{tmp_path}/c"
    return f"memory:///btfast-test/{tmp_path.name}/c"


@pytest.mark.parametrize("kind", ["path", "file-url", "memory"])
@pytest.mark.parametrize("how", ["folder", "pattern", "glob", "list", "one"])
def test_list_shards(kind, how, tmp_path, request):
    root = _collection(kind, tmp_path, request)
    write_collection(root, shards=3, per_shard=2)  # with 0000k_stats.json beside each shard
    with fs.open_file(fs.join(root, "notes.parquet"), "wb") as f:
        f.write(b"not a shard")
    names = [fs.join(root, f"{k:05d}.tar") for k in range(3)]
    if how == "folder":
        spec = root
    elif how == "pattern":
        spec = fs.join(root, "{00000..00002}.tar")
    elif how == "glob":
        spec = fs.join(root, "*.tar")
    elif how == "list":
        spec = fs.join(root, "shards.txt")
        with fs.open_file(spec, "wb") as f:
            f.write(b"# three shards\n00000.tar\n\n00001.tar\n" + names[2].encode() + b"\n")
    else:
        spec, names = names[1], names[1:2]
    got = list_shards(spec)
    if kind == "file-url" and how in ("folder", "glob"):
        names = [n.removeprefix("file://") for n in names]  # listed from the store: plain local paths
    assert got == names
    assert all(fs.exists(n) for n in got)


def test_list_shards_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list_shards(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "00000_stats.json").write_text("{}")
    with pytest.raises(ValueError, match="no .tar shards"):
        list_shards(str(tmp_path / "empty"))


# ---- samples of a shard ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_field", [None, "caption"])
def test_read_shard_groups_members_as_webdataset(tmp_path, text_field):
    written = write_collection(str(tmp_path), shards=2, per_shard=5)
    for s in range(2):
        shard = read_shard(fs.read_bytes(str(tmp_path / f"{s:05d}.tar")), text_field=text_field)
        assert shard.truncated is None
        mine = [w for w in written if w["shard"] == s]
        assert [x.key for x in shard.samples] == [w["key"] for w in mine]
        assert [x.image for x in shard.samples] == [w["jpg"] for w in mine]
        assert [x.text for x in shard.samples] == [w["caption"] for w in mine]
        assert [x.image_member for x in shard.samples] == [f"{w['key']}.jpg" for w in mine]
        assert all(x.image_error is x.text_error is x.error is None for x in shard.samples)


def test_read_shard_keys_suffixes_and_preferences():
    data = tar_bytes(
        [
            # key d/a (up to the first dot), members sorted: a.b.PNG, a.b.seg.png, a.b.txt; the first png serves
            {"__key__": "d/a.b", "seg.png": b"P", "PNG": b"Q", "txt": "dotted"},
            {"__key__": "c", "webp": b"W", "jpeg": b"J", "txt": "two images"},  # jpeg preferred over webp
        ]
    )
    shard = read_shard(data)
    got = [(s.key, s.image, s.image_member, s.text) for s in shard.samples]
    assert got == [("d/a", b"Q", "d/a.b.png", "dotted"), ("c", b"J", "c.jpeg", "two images")]


@pytest.mark.parametrize(
    "sample, field, error",
    [
        ({"__key__": "k", "jpg": b"\xff\xd8junk"}, "text_error", "no txt member"),
        ({"__key__": "k", "txt": "only text"}, "image_error", "no jpg/jpeg/png/webp member"),
        ({"__key__": "k", "jpg": b"x", "txt": b"\xff\xfe bad"}, "text_error", "not UTF-8"),
        ({"__key__": "k", "jpg": b"x", "json": b"{not json"}, "text_error", "malformed json"),
        ({"__key__": "k", "jpg": b"x", "json": {"url": "u"}}, "text_error", "no field 'caption'"),
        ({"__key__": "k", "jpg": b"x", "json": {"caption": 3}}, "text_error", "is a int, not a string"),
    ],
)
def test_read_shard_bad_members_are_reasons(sample, field, error):
    text_field = "caption" if "json" in sample else None
    (s,) = read_shard(tar_bytes([sample]), text_field=text_field).samples
    assert error in getattr(s, field)
    assert s.key == "k"


def test_read_shard_leaves_corrupt_images_to_the_loader():
    (s,) = read_shard(tar_bytes([{"__key__": "k", "jpg": b"\xff\xd8 not a jpeg", "txt": "t"}])).samples
    assert s.image == b"\xff\xd8 not a jpeg" and s.image_error is None and s.text == "t"


def test_read_shard_duplicate_members():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in (("k.jpg", b"1"), ("k.txt", b"t"), ("k.jpg", b"2"), ("nodot", b"z"), ("m.txt", b"u")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    shard = read_shard(buf.getvalue())
    assert [(s.key, s.error) for s in shard.samples] == [("k", "sample: two members with the same suffix"), ("m", None)]


def _full_tar(n=6):
    return tar_bytes([{"__key__": f"s{i}", "jpg": bytes([i]) * (700 + i), "txt": f"caption {i}"} for i in range(n)])


def test_truncated_tar_yields_readable_samples_and_says_so():
    data = _full_tar()
    full = read_shard(data)
    assert full.truncated is None and len(full.samples) == 6
    seen_cut = set()
    # every cut point on a block boundary and inside blocks, up to the end-of-archive marker
    end = data.rindex(b"caption 5") + 512
    for cut in list(range(512, end, 256)) + [end - 1]:
        shard = read_shard(data[:cut])
        assert shard.truncated, cut
        got = shard.samples
        seen_cut.add(len(got))
        if not got:  # cut inside the first member's headers or data
            continue
        # every sample before the cut is whole and equal; the last one may be partial, with a reason
        for s, ref in zip(got[:-1], full.samples):
            assert (s.key, s.image, s.text) == (ref.key, ref.image, ref.text)
        last = got[-1]
        ref = full.samples[len(got) - 1]
        assert last.key == ref.key
        if last.error is None:  # the cut fell after its last member
            assert (last.image, last.text) == (ref.image, ref.text)
        else:
            assert last.error.startswith("sample: cut where the shard is truncated")
    assert seen_cut == {0, 1, 2, 3, 4, 5, 6}


def test_tar_without_end_marker_is_truncated():
    data = _full_tar(2)
    marker = data.rindex(b"caption 1") + 512  # end of the last member's block: the marker starts here
    shard = read_shard(data[:marker])
    assert "without the end-of-archive marker" in shard.truncated and len(shard.samples) == 2


@pytest.mark.parametrize(
    "data, match", [(b"", "empty"), (b"\x1f\x8b\x08rest", "gzip"), (b"x" * 2000, "invalid header")]
)
def test_not_a_tar(data, match):
    with pytest.raises(tarfile.ReadError, match=match):
        read_shard(data)


# ---- read-ahead -------------------------------------------------------------------------------------------------
def test_read_ahead_reads_the_next_item_while_this_one_is_used():
    started = {k: threading.Event() for k in range(4)}

    def read(k):
        started[k].set()
        if k == 2:
            raise OSError("gone")
        return k * 10

    got = []
    for k, fut in read_ahead(range(4), read, depth=1):
        if k < 3:  # while the caller holds item k, item k + 1 is being read (no timing: it is waited for)
            assert started[k + 1].wait(10)
        try:
            got.append(fut.result())
        except OSError as e:
            got.append(str(e))
    assert got == [0, 10, "gone", 30]


def test_read_ahead_closed_early_stops_reading():
    calls = []
    it = read_ahead(range(100), lambda k: calls.append(k) or k, depth=2)
    assert next(it)[1].result() == 0
    it.close()
    assert len(calls) <= 3


# ---- the same collection on a local S3 server ------------------------------------------------------------------
def test_shards_on_s3_read_as_from_disk(s3_bucket, tmp_path):
    root = f"{s3_bucket}/collection"
    written = write_collection(root, shards=3, per_shard=4)
    local = write_collection(str(tmp_path), shards=3, per_shard=4)
    assert written == local
    for spec in (root, f"{root}/{{00000..00002}}.tar", f"{root}/*.tar"):
        shards = list_shards(spec)
        assert shards == [f"{root}/{k:05d}.tar" for k in range(3)]
    samples = []
    for _, fut in read_ahead(list_shards(root), fs.read_bytes):
        shard = read_shard(fut.result())
        assert shard.truncated is None
        samples += shard.samples
    assert [(s.key, s.image, s.text) for s in samples] == [(w["key"], w["jpg"], w["caption"]) for w in local]
    assert samples[5].key == sample_key(1, 1)


def test_missing_shard_on_s3_is_an_error_of_that_shard(s3_bucket):
    write_collection(s3_bucket, shards=2, per_shard=1)
    got = []
    for name, fut in read_ahead(list_shards(f"{s3_bucket}/{{00000..00002}}.tar"), fs.read_bytes):
        try:
            got.append(len(read_shard(fut.result()).samples))
        except FileNotFoundError:
            got.append(fs.basename(name))
    assert got == [1, 1, "00002.tar"]


@pytest.mark.parametrize("kind", ["path", "file-url", "memory"])
def test_write_atomic_replaces_whole(kind, tmp_path, request):
    root = _collection(kind, tmp_path, request)
    target = fs.join(root, "sub/part-00001.jsonl")
    fs.write_atomic(target, b"first\n")
    fs.write_atomic(target, b"second\n")
    assert fs.read_bytes(target) == b"second\n"
    assert [fs.basename(n) for n in fs.listdir(fs.parent(target))] == ["part-00001.jsonl"]  # no temporary left


def test_write_atomic_on_s3(s3_bucket):
    fs.write_atomic(f"{s3_bucket}/out/x.parquet", b"abc")
    assert fs.read_bytes(f"{s3_bucket}/out/x.parquet") == b"abc"
    assert fs.listdir(f"{s3_bucket}/out") == [f"{s3_bucket}/out/x.parquet"]


# ---- shards as input rows ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kinds", [("pair",), ("image",), ("text",), ("image", "text")])
def test_shard_reader_rows(tmp_path, kinds):
    from btfast.io.webdataset import ShardReader

    written = write_collection(str(tmp_path / "c"), shards=3, per_shard=4)
    bad = tar_bytes([{"__key__": "noimage", "txt": "t"}, {"__key__": "notext", "jpg": written[0]["jpg"]}])
    (tmp_path / "c" / "00003.tar").write_bytes(bad)
    full = _full_tar(3)
    (tmp_path / "c" / "00004.tar").write_bytes(full[: full.index(bytes([1]) * 701) + 100])  # s1's image is cut
    src = ShardReader(str(tmp_path / "c"), kinds=kinds)
    got = list(src.read(lambda k: k != 1))
    assert [s.index for s in got] == [0, 2, 3, 4]
    assert [s.truncated is not None for s in got] == [False, False, False, True]
    rows = [r for s in got[:2] for r in s.rows]
    mine = [w for w in written if w["shard"] != 1]
    assert [(r.id, r.kind) for r in rows] == [(w["key"], k) for w in mine for k in kinds]
    assert all(r.error is None for r in rows)
    for r in rows:
        assert (r.image is not None) == (r.kind != "text") and (r.text is not None) == (r.kind != "image")
    keys = {r.image_key for r in rows if r.image_key}
    assert len(keys) == (5 if "text" not in kinds or len(kinds) > 1 else 0)  # five distinct images, deduplicated
    errors = {(r.id, r.kind): r.error for r in got[2].rows}
    expect = {"pair": ("no jpg", "no txt"), "image": ("no jpg", None), "text": (None, "no txt")}
    for kind in kinds:
        for key, want in zip(("noimage", "notext"), expect[kind]):
            assert (want in errors[(key, kind)]) if want else errors[(key, kind)] is None
    cut = got[3].rows
    assert [(r.id, r.error) for r in cut[: len(kinds)]] == [("s0", None)] * len(kinds)
    assert [r.id for r in cut[len(kinds) :]] == ["s1"] * len(kinds)
    assert all(r.error.startswith("sample: cut where the shard is truncated") for r in cut[len(kinds) :])


def test_shard_reader_unreadable_shard(tmp_path):
    from btfast.io.webdataset import ShardReader

    write_collection(str(tmp_path), shards=1, per_shard=2)
    (tmp_path / "00001.tar").write_bytes(b"not a tar at all" * 100)
    got = list(ShardReader(str(tmp_path / "{00000..00002}.tar")).read())
    assert [(s.index, len(s.rows)) for s in got] == [(0, 2), (1, 0), (2, 0)]
    assert got[0].error is None
    assert "ReadError" in got[1].error and "FileNotFoundError" in got[2].error
