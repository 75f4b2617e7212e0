"""The CUDA path traced without a GPU: btfast's forward on fake CUDA tensors, through dynamo (strict export, one
graph), with every op served by the Triton custom ops.

What this checks that the interpreter tests cannot: that on CUDA tensors the op table picks the kernels, that
`torch.ops.btfast.*` (torch.library.triton_op) trace under dynamo with their launchers, grids and autotuners,
and that the forward has no graph break, as the runtime's compile needs. Fake CUDA tensors need a CUDA build of
torch (not a GPU); CI's CPU build skips this, a GPU machine runs the real thing in test_engine_triton.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

needs_cuda_build = pytest.mark.skipif(
    not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch (a GPU is not needed)"
)

SCRIPT = textwrap.dedent(
    """
    import collections, dataclasses, json, sys
    import torch, transformers
    from torch._subclasses.fake_tensor import FakeTensorMode
    import btfast
    from btfast.testing import build, random_inputs, tiny_config

    head, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    cfg = tiny_config(link_tower_type="interpolate")
    fast = btfast.optimize(build(getattr(transformers, head), cfg), compile=False, cuda_graphs=False)
    mode = FakeTensorMode()

    def fake(obj, cast=True):
        if isinstance(obj, torch.Tensor):
            with mode:
                kind = dtype if cast and obj.is_floating_point() else obj.dtype
                return torch.empty_strided(obj.shape, obj.stride(), dtype=kind, device="cuda")
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.replace(obj, **{f.name: fake(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        if isinstance(obj, (list, tuple)):
            return type(obj)(fake(o) for o in obj)
        return obj

    fast.weights = fake(fast.weights)
    x = random_inputs(cfg, batch=2, seq_len=7, lengths=[7, 4])
    args = (fake(x["input_ids"]), fake(x["attention_mask"].bool()), fake(x["pixel_values"]))

    class Forward(torch.nn.Module):
        def forward(self, ids, mask, pixels):
            return fast._raw_forward(ids, mask, pixels)

    graph = torch.export.export(Forward(), args, strict=True).graph_module.graph
    calls = collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function")
    print(json.dumps({"calls": calls, "used": dict(fast.ops.used), "fallbacks": dict(fast.ops.fallbacks)}))
    """
)


@needs_cuda_build
@pytest.mark.parametrize(
    "head",
    ["BridgeTowerModel", "BridgeTowerForImageAndTextRetrieval", "BridgeTowerForMaskedLM"],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_traces_through_the_triton_ops_in_one_graph(head, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernels as on a GPU
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, head, dtype], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    calls = out["calls"]
    for op in ("linear", "add_layernorm", "attention"):
        assert calls.get(f"btfast.{op}.default", 0) > 0, calls
    torch_paths = [t for t in calls if "layer_norm" in t or "scaled_dot_product" in t or t.startswith(("aten.addmm", "aten.linear"))]
    assert not torch_paths, f"ops left to torch on CUDA: {torch_paths}"
    assert out["fallbacks"] == {} and out["used"] == {}  # traced: the op table keeps no books
