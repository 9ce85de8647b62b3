"""Deployment: the graph backend, ONNX export (onnxruntime), torch.export, TorchScript export.

Exports are slow (seconds each), so every exported graph is made once per module (fixtures)
and shared by the tests that read it. Eager results come from the default backends; the
graphs are run at a batch size other than the one they were exported with.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch

import vtome_kernels as vt
from cases import assert_same_plan, make, merge_cases, Case
import patch_models

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

N, C, D, R = 24, 6, 5, 8  # tokens, channels, metric dim, r of the op-level graphs


def _session(proto):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(sess, *inputs):
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feed)]


def _onnx(model, args, batch_dims=None):
    """torch.onnx.export with dynamo=True and a dynamic batch (dim 0 of every input)."""
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        return torch.onnx.export(model, args, dynamic_shapes=tuple({0: batch} for _ in args), dynamo=True,
                                 verbose=False).model_proto


# -- the graph backend, eagerly, against the reference ------------------------------------------------
@pytest.mark.parametrize("case", merge_cases(), ids=str)
def test_graph_backend_matches_reference(case):
    """Same matching as the reference on every shared case (their scores are well separated, and
    duplicated tokens tie exactly), merged values within float32 rounding."""
    x, size, metric = make(case)
    kw = dict(class_token=case.class_token, distill_token=case.distill_token)
    m = x if metric is None else metric
    assert_same_plan(vt.match(m, case.r, backend="graph", **kw), vt.match(m, case.r, backend="reference", **kw))
    got = vt.merge(x, size, case.r, metric=metric, backend="graph", **kw)
    want = vt.merge(x, size, case.r, metric=metric, backend="reference", **kw)
    tol = dict(atol=1e-5, rtol=1e-5) if x.dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("mode", ["drop", "hybrid"])
def test_graph_backend_modes(mode):
    case = Case((2, 3), 15, 4, dups=3, sizes="random", seed=7)
    x, size, metric = make(case)
    kw = dict(mode=mode, threshold=0.1 if mode == "hybrid" else None)
    plan = vt.match(metric, case.r, backend="graph", **kw)
    want = vt.match(metric, case.r, backend="reference", **kw)
    assert_same_plan(plan, want)
    torch.testing.assert_close(plan.merge(x, size), want.merge(x, size))
    torch.testing.assert_close(plan.merge_source(), want.merge_source())
    torch.testing.assert_close(plan.unmerge(x[..., :-case.r, :]), want.unmerge(x[..., :-case.r, :]))


def test_rows_without_a_source_are_copied_bit_for_bit():
    x, size, metric = make(Case((3,), 24, 8, sizes="random", seed=3))
    plan = vt.match(metric, 8, backend="graph")
    out, _ = plan.merge(x, size)
    received = torch.zeros(3, 16, dtype=torch.bool).scatter(1, plan._dst_pos, True)
    base = x.gather(1, plan.out_idx[..., None].expand(-1, -1, x.shape[-1]))
    assert torch.equal(out[~received], base[~received])


def test_graph_chosen_while_exporting():
    """While torch.jit.trace (and torch.onnx.export) traces, every backend name resolves to
    the graph backend; torch.export keeps the named one (its vtome:: ops load after import)."""
    from vtome_kernels.backends import resolve

    name = "cpp" if vt.backends()["cpp"].available else "reference"
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(resolve(name, "merge", x.device).NAME)
            return x + 1

    torch.jit.trace(Probe(), (torch.zeros(2),), check_trace=False)
    torch.export.export(Probe(), (torch.zeros(2),))
    assert seen == ["graph", name]
    assert resolve(name, "merge", torch.device("cpu")).NAME == name


# -- every public op, exported to ONNX once ------------------------------------------------------------
class Ops(torch.nn.Module):
    """Every public op in one graph: ST merge (class token), DST merge, the plan's ops in
    hybrid mode, select and proportional attention."""

    def forward(self, x, metric, size, frames, q):
        xm, sm = vt.merge(x, size, R, metric=metric, class_token=True)
        plan = vt.match(metric, R, mode="hybrid", threshold=0.2)
        xp, sp = plan.merge(x, size)
        src = plan.merge_source()
        full = plan.unmerge(xp)
        xd, sd = vt.merge(frames, None, 3)
        kept, index = vt.select(frames, 12)
        att = vt.prop_attention(q, q, q, sm)
        return xm, sm, plan.out_idx, xp, sp, src, full, xd, sd, kept, index, att


def _ops_inputs(batch: int, seed: int, dups: int = 0):
    x, size, metric = make(Case((batch,), N, R, c=C, d=D, sizes="random", dups=dups, seed=seed))
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, 4, 10, C, generator=g)
    q = torch.randn(batch, 2, N - R, 4, generator=g)
    return x, metric, size, frames, q


@pytest.fixture(scope="module")
def ops_session():
    return _session(_onnx(Ops(), _ops_inputs(2, seed=0)))


@pytest.mark.parametrize("dups", [0, 12], ids=["random", "duplicated-tokens"])
def test_ops_in_onnxruntime(ops_session, dups):
    """onnxruntime at batch 3 gives the eager results (exported at batch 2); with half the tokens
    duplicated (exact ties) it makes the reference's choices exactly."""
    args = _ops_inputs(3, seed=5 + dups, dups=dups)
    got = _run(ops_session, *args)
    with torch.no_grad():
        want = Ops()(*args)
    x, metric = args[0], args[1]
    ref = vt.match(metric, R, backend="reference")
    assert torch.equal(got[2], ref.out_idx)  # the hybrid plan's layout = the reference matching
    assert torch.equal(got[10], want[10])  # select's index
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w.to(g.dtype), atol=1e-5, rtol=1e-5)


def test_identical_tokens_tie_exactly_in_onnxruntime(ops_session):
    """Bit-identical tokens everywhere (a static video): every tie is exact, so onnxruntime must
    pick by position exactly as the reference does."""
    x, metric, size, frames, q = _ops_inputs(3, seed=11)
    metric[:, 2::4] = metric[:, 0:1]  # many A copies of token 0
    metric[:, 3::4] = metric[:, 1:2]  # many B copies of token 1
    frames[:, 2] = frames[:, 1]
    got = _run(ops_session, x, metric, size, frames, q)
    ref = vt.match(metric, R, mode="hybrid", threshold=0.2, backend="reference")
    assert torch.equal(got[2], ref.out_idx)
    kept, index = vt.select(frames, 12, backend="reference")
    assert torch.equal(got[10], index)


# -- every patched family, exported to ONNX --------------------------------------------------------------
R_FAMILY = {"timm": 8, "videomae": 4, "vivit": 4, "timesformer": 2, "vjepa2": 4}


def test_every_family_is_exported():
    """A family added to vt.patch.FAMILIES gets its export test here too."""
    assert set(R_FAMILY) == set(vt.patch.FAMILIES)


@pytest.fixture(scope="module")
def family_graphs():
    """family -> (patched model, its ONNX session); timm's unpatched node count too."""
    out = {}
    for family, r in R_FAMILY.items():
        model, x, patch, _ = patch_models.build(family)
        if family == "timm":
            out["timm-unpatched-nodes"] = len(_onnx(model, (x,)).graph.node)
        patch(model, r=r)
        proto = _onnx(model, (x,))
        out[family] = (model, _session(proto), proto, x.shape)
    return out


@pytest.mark.parametrize("family", list(R_FAMILY))
def test_patched_family_in_onnxruntime(family_graphs, family):
    """Exported at batch 2, run at batch 3: onnxruntime gives eager's logits (small models, well
    separated scores), and the model did merge."""
    model, sess, _, shape = family_graphs[family]
    x = torch.randn((3,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = patch_models.logits(model, x)
    counts = vt.patch.token_counts(model, x.shape)
    assert counts[-1] < counts[0]
    (got,) = _run(sess, x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_patched_graph_size(family_graphs):
    """A patched timm ViT's graph stays within 3x the unpatched node count (no unrolled loops)."""
    _, _, proto, _ = family_graphs["timm"]
    assert len(proto.graph.node) <= 3 * family_graphs["timm-unpatched-nodes"]


@pytest.mark.parametrize("family", list(R_FAMILY))
def test_onnx_graph_uses_standard_ops(family_graphs, family):
    """Only default-domain ONNX ops at opset >= 18 (no custom op, nothing of a vtome domain)."""
    _, _, proto, _ = family_graphs[family]
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {o.domain: o.version for o in proto.opset_import}.get("", 0) >= 18


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return patch_models.logits(self.model, x)


# -- the TorchScript exporter and torch.export -------------------------------------------------------
def test_torchscript_exporter():
    """dynamo=False: the package's own code traces (no bool arithmetic on traced shapes)."""
    model, x, patch, _ = patch_models.build("timm")
    patch(model, r=8)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x3 = torch.randn((3,) + tuple(x.shape[1:]))
    with torch.no_grad():
        want = patch_models.logits(model, x3)
    torch.testing.assert_close(torch.from_numpy(sess.run(None, {"x": x3.numpy()})[0]), want, atol=1e-4, rtol=1e-4)


def test_saved_torch_export_program_loads_in_a_fresh_process(tmp_path):
    """A saved torch.export program (dynamic batch) loads and runs after `import vtome_kernels`
    alone, and gives eager's logits at another batch size (with the default backend's ops,
    and with backend="graph": plain aten ops only)."""
    model, x, patch, _ = patch_models.build("videomae")
    patch(model, r=4)
    model = Logits(model)  # a tensor out: transformers' output classes need transformers to load
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        model.model._vt.backend = "graph"
        plain = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        model.model._vt.backend = "auto"
    assert not any(str(n.target).startswith("vtome") for n in plain.graph.nodes)
    torch.export.save(program, tmp_path / "model.pt2")
    torch.export.save(plain, tmp_path / "plain.pt2")
    x3 = torch.randn((3,) + tuple(x.shape[1:]))
    with torch.no_grad():
        want = patch_models.logits(model, x3)
    torch.save({"x": x3, "want": want}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, vtome_kernels
        io = torch.load({str(tmp_path / 'io.pt')!r})
        for name in ("model.pt2", "plain.pt2"):
            program = torch.export.load({str(tmp_path)!r} + "/" + name)
            out = program.module()(io["x"])
            torch.testing.assert_close(out, io["want"], atol=1e-4, rtol=1e-4)
        assert "transformers" not in __import__("sys").modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
