"""Every Python snippet of README.md runs as pasted, on tiny saved model folders instead of /models/..., on CPU.

The only changes made to a snippet: a `/models/...` path becomes a tiny folder of the same head (ITC when the
name says itc), a relative data folder becomes absolute, and without CUDA `"cuda"` becomes `"cpu"` and bf16
becomes fp32 (CPUs here have no bf16 units). The snippets run in a folder holding `cats.jpg` and `dogs.jpg`.
Two sketches outside the examples (the opening lines and the runtime section's `Buckets` call) continue an
example: they get `model`, `inputs`, `btfast` and `torch`. The Ray snippet runs in `tests/test_ray.py` (it needs
a Ray instance).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fixtures_saved_model import photo, sentences
from jobs import one_torch_thread  # noqa: F401  (autouse: one torch thread)

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def localise(code: str, folders: dict[str, Path], where: Path) -> str:
    """The snippet with tiny folders for /models/..., a relative data folder (`"pairs/"`) made absolute (Ray's
    workers have a folder of their own) and, without CUDA, CPU and fp32."""
    code = re.sub(r'"([a-z_]+/)"', lambda m: repr(f"{where}/{m.group(1)}"), code)
    code = re.sub(r'"/models/([^"]+)"', lambda m: repr(str(folders["itc" if "itc" in m.group(1) else "itm"])), code)
    if not torch.cuda.is_available():
        code = code.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32")
    return code


def run_snippet(code: str, folders: dict[str, Path], where: Path, **names: object) -> dict:
    """Run the localised snippet in `where` (which gets cats.jpg and dogs.jpg); returns its namespace."""
    import os

    photo(80, 60, 1).save(where / "cats.jpg")
    photo(64, 64, 2).save(where / "dogs.jpg")
    ns: dict = {"__name__": "readme", **names}
    cwd = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(localise(code, folders, where), f"README.md snippet in {where}", "exec"), ns)
    finally:
        os.chdir(cwd)
    return ns


LOCAL = [(line, code) for line, code in snippets() if "import ray" not in code]


def test_the_readme_has_the_snippets_this_file_runs():
    assert len(LOCAL) >= 6 and any("import ray" in code for _, code in snippets())


@pytest.mark.parametrize("line, code", LOCAL, ids=[f"line{line}" for line, _ in LOCAL])
def test_readme_snippet_runs(saved_models, tmp_path, line, code, capsys):
    from transformers import BridgeTowerForImageAndTextRetrieval, BridgeTowerProcessor

    folder = saved_models["itm"]
    processor = BridgeTowerProcessor.from_pretrained(str(folder))
    model = BridgeTowerForImageAndTextRetrieval.from_pretrained(str(folder)).eval()
    inputs = processor(photo(48, 40, 3), sentences(1)[0], return_tensors="pt")
    import btfast

    sketch = "from_pretrained" not in code  # the examples load their own model and import what they use
    names = {"model": model, "inputs": inputs, "btfast": btfast, "torch": torch} if sketch else {}
    ns = run_snippet(code, saved_models, tmp_path, **names)
    computed = [ns.get(k) for k in ("scores", "loss", "logits", "outputs") if ns.get(k) is not None]
    assert computed or "print(" in code  # every snippet computes something, or prints it
    for value in computed:  # ... and it is finite
        if isinstance(value, dict) and not isinstance(value, torch.Tensor) and not hasattr(value, "logits"):
            assert all(isinstance(v, float) and v == v for v in value.values()), value
        else:
            t = getattr(value, "logits", value)
            assert torch.isfinite(t).all()
    if "print(" in code:
        assert capsys.readouterr().out.strip()
