"""The CUDA path traced without a GPU: btfast's forward and its stages on fake CUDA tensors, through dynamo
(strict export, one graph), with every op served by the Triton custom ops.

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
    from btfast.model import BridgeTower
    from btfast.testing import build, random_inputs, tiny_config

    head, dtype, stage = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
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

    m = BridgeTower(fake(fast.weights), fast.ops, fast.spec)  # the forward the runtime runs, eager layers
    x = random_inputs(cfg, batch=2, seq_len=7, lengths=[7, 4])
    ids, mask, pixels = fake(x["input_ids"]), fake(x["attention_mask"].bool()), fake(x["pixel_values"])
    s = fast.spec
    with mode:  # the bridges the towers hand to the fusion stage: (B, C, L, H) and (B, C, N, H)
        text_bridges = torch.empty(2, s.cross_layers, 7, s.hidden, dtype=dtype, device="cuda")
        image_bridges = torch.empty(2, s.cross_layers, s.image_tokens, s.hidden, dtype=dtype, device="cuda")
    fn, args = {
        "forward": (m.forward, (ids, mask, pixels)),
        "text": (lambda i, k: (lambda ts: (ts.bridges, ts.cls))(m.encode_text(i, k)), (ids, mask)),
        "image": (lambda p: (m.encode_image(p).bridges,), (pixels,)),
        "fuse": (m.fuse, (text_bridges, mask, image_bridges)),
    }[stage]

    class Stage(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    graph = torch.export.export(Stage(), args, strict=True).graph_module.graph
    calls = collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function")
    print(json.dumps({"calls": calls, "used": dict(fast.ops.used), "fallbacks": dict(fast.ops.fallbacks)}))
    """
)


CASES = [(head, dtype, "forward") for head in ("BridgeTowerModel", "BridgeTowerForImageAndTextRetrieval",
         "BridgeTowerForMaskedLM") for dtype in ("float32", "bfloat16")]  # fmt: skip
CASES += [("BridgeTowerForImageAndTextRetrieval", "bfloat16", stage) for stage in ("text", "image", "fuse")]


@needs_cuda_build
@pytest.mark.parametrize("head,dtype,stage", CASES, ids=["-".join(c) for c in CASES])
def test_stages_trace_through_the_triton_ops_in_one_graph(head, dtype, stage):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernels as on a GPU
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, head, dtype, stage], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    calls = out["calls"]
    for op in ("linear", "add_layernorm", "attention"):
        assert calls.get(f"btfast.{op}.default", 0) > 0, calls
    torch_ops = ("layer_norm", "scaled_dot_product", "aten.addmm", "aten.linear")
    torch_paths = [t for t in calls if any(name in t for name in torch_ops)]
    assert not torch_paths, f"ops left to torch on CUDA: {torch_paths}"
    assert out["fallbacks"] == {} and out["used"] == {}  # traced: the op table keeps no books
