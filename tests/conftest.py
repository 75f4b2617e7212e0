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
