"""Test setup (TRITON_INTERPRET is set by the root conftest.py): keep torch to this machine's cores."""

import os

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# ---- saved tiny model folders (btfast score / retrieve / embed / preprocess tests) ----------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """{"itm": folder, "itc": folder}: tiny models saved with tokenizer and processor, built once per session."""
    from fixtures_saved_model import save_model_folder

    root = tmp_path_factory.mktemp("saved_models")
    return {head: save_model_folder(root / head, head=head, seed=i) for i, head in enumerate(("itm", "itc"))}


@pytest.fixture
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill every float tensor from ``torch.empty`` with NaN, so an output element the kernel skips shows."""
    empty = torch.empty

    def nan_empty(*args: object, **kwargs: object) -> torch.Tensor:
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.dtype.is_floating_point else out

    monkeypatch.setattr(torch, "empty", nan_empty)


# ---- a local S3-protocol server (WebDataset shards on an object store) ------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint():
    """The endpoint of a moto S3 server started for this session; skips (with the reason) if it cannot start."""
    from fixtures_shards import s3_server

    try:
        server = s3_server()
        endpoint = server.__enter__()
    except Exception as e:  # moto / s3fs missing, or no local socket: the S3 tests cannot run here
        pytest.skip(f"local S3 server (moto) cannot start: {type(e).__name__}: {e}")
    yield endpoint
    server.__exit__(None, None, None)


_BUCKETS = iter(range(1 << 30))


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the local S3 server, as an `s3://` URL."""
    import fsspec

    name = f"btfast-test-{next(_BUCKETS)}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"
