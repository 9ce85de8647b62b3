"""Options that reproduce the published code of the video paper (issue 14): hybrid mode,
layer choice, TimeSformer's proportional attention. (The (r, inflect) schedule rule is in
test_schedule.py.) Expectations are worked out by hand or by loops written here from the
rules in ALGORITHM.md; no published code is used."""

from __future__ import annotations

import math

import pytest
import torch

import vtome_kernels as vt

try:  # imported now, while conftest.py's TRITON_INTERPRET=1 is set, so its interpreter works
    import triton  # noqa: F401
except ImportError:
    pass

BACKENDS = ["reference", "cpp", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend: the C++ one where it is built, Triton in its CPU interpreter."""
    if request.param == "triton":
        request.getfixturevalue("triton_interpret")  # skips where triton is not installed
    elif request.param == "cpp":
        ok, why = vt.backends()["cpp"]
        if not ok:
            pytest.skip(why)
    return request.param


# -- hybrid ---------------------------------------------------------------------------------
# The worked example: A = positions 0, 2, 4; B = 1, 3, 5. Position 0 is the one
# source (r = 1), matched to position 1 with cosine 1.9 / sqrt(1.81 * 2) = 0.99862.
EXAMPLE_METRIC = [[1, 0.9], [1, 1], [0, 1], [-1, 0], [-1, -0.5], [0, -1]]


@pytest.mark.parametrize("threshold,kept,want_x,want_s,row2", [
    (0.999, False, [50, 30, 10, 40, 60], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]),  # 20 dropped, 10 stays
    (0.5, True, [50, 30, 15, 40, 60], [1, 1, 2, 1, 1], [1, 1, 0, 0, 0, 0]),     # 10 and 20 merge
])
def test_hybrid_worked_example(backend, threshold, kept, want_x, want_s, row2):
    metric = torch.tensor(EXAMPLE_METRIC)[None]
    x = torch.tensor([10.0, 20, 30, 40, 50, 60])[None, :, None]
    plan = vt.match(metric, 1, mode="hybrid", threshold=threshold, backend=backend)
    assert plan.src_idx.tolist() == [[0]] and plan.dst_idx.tolist() == [[1]]
    assert abs(plan.src_score.item() - 1.9 / math.sqrt(1.81 * 2)) < 1e-6
    assert plan.merged.tolist() == [[True]]  # the source always merges
    assert plan.dst_kept.tolist() == [[kept]]
    y, s = plan.merge(x)
    assert y[0, :, 0].tolist() == want_x and s[0, :, 0].tolist() == want_s
    source = plan.merge_source()
    assert source[0, 2].tolist() == row2  # the output row of destination 1
    assert torch.equal(y, vt.merge(x, None, 1, metric=metric, mode="hybrid", threshold=threshold,
                                   backend=backend)[0])


def _angles(degrees):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def test_hybrid_sources_sharing_a_destination(backend):
    # B (odd positions) at 0, 90, 180, 270 degrees. A: positions 0, 2, 4 go to position 1
    # (cosines .990, .951, .766), position 6 goes to position 3 (.996). r = 4: all merge.
    metric = _angles([8, 0, -18, 90, 40, 180, 85, 270])[None]
    x = torch.arange(8, dtype=torch.float32).mul(10)[None, :, None].repeat(1, 1, 3)
    size = torch.tensor([1.0, 5, 2, 3, 4, 1, 2, 1])[None, :, None]
    # An earlier merge left position 1 holding original patches {1, 8}, position 0 {0, 9}.
    source = torch.eye(8, 10, dtype=torch.bool)[None].clone()
    source[0, 1, 8] = source[0, 0, 9] = True
    plan = vt.match(metric, 4, mode="hybrid", threshold=0.9, backend=backend)
    assert plan.dst_idx.tolist() == [[3, 1, 1, 1]]  # ranked: 6 (.996), 0, 2, 4 (.766)
    assert plan.dst_kept.tolist() == [[True, False, False, False]]
    y, s = plan.merge(x, size)
    # Position 1 (x = 10, size 5) is dropped: 0, 2, 4 alone. Position 3 keeps its own.
    want_x = [(0 * 1 + 20 * 2 + 40 * 4) / 7, (30 * 3 + 60 * 2) / 5, 50, 70]
    torch.testing.assert_close(y[0], torch.tensor(want_x)[:, None].expand(4, 3))
    assert s[0, :, 0].tolist() == [7, 5, 1, 1]
    rows = [set(torch.nonzero(r).flatten().tolist()) for r in plan.merge_source(source)[0]]
    assert rows == [{0, 9, 2, 4}, {3, 6}, {5}, {7}]  # 1 and 8 (the dropped token) left the map
    full = plan.unmerge(y)  # sources and the dropped destination read their merged token
    assert torch.equal(full[0, [0, 1, 2, 4]], y[0, [0, 0, 0, 0]])


def _published_hybrid(x, size, source, plan, threshold):
    """The video paper's hybrid rule on a merge-mode plan, in float64, one loop per group:
    each destination's own x·size and size are multiplied by the product over its sources
    of (score >= threshold); every source adds its x·size and size; the source map row is
    the union of the sources and (if kept) the destination's own row."""
    def rows(t):  # [*lead, N, C] -> [G, N, C]
        return t.reshape((-1,) + t.shape[-2:])

    def idx(t):  # [*lead, K] -> [G, K]
        return t.reshape(-1, t.shape[-1])

    g_out_x, g_out_s, g_src = [], [], []
    for xs, ss, src_map, out, srcs, dsts, scores in zip(
            rows(x).double(), rows(size).double(), rows(source).double(), idx(plan.out_idx),
            idx(plan.src_idx), idx(plan.dst_idx), idx(plan.src_score)):
        rows_x, rows_s, rows_src = [], [], []
        for pos in out.tolist():
            mine = [(p, sc) for p, d, sc in zip(srcs.tolist(), dsts.tolist(), scores.tolist()) if d == pos]
            keep = float(all(sc >= threshold for _, sc in mine))
            acc, tot, union = xs[pos] * ss[pos] * keep, ss[pos] * keep, src_map[pos] * keep
            for p, _ in mine:
                acc, tot, union = acc + xs[p] * ss[p], tot + ss[p], torch.maximum(union, src_map[p])
            rows_x.append(acc / tot)
            rows_s.append(tot)
            rows_src.append(union)
        g_out_x.append(torch.stack(rows_x))
        g_out_s.append(torch.stack(rows_s))
        g_src.append(torch.stack(rows_src))
    lead = plan.out_idx.shape
    return (torch.stack(g_out_x).reshape(lead + x.shape[-1:]), torch.stack(g_out_s).reshape(lead + (1,)),
            torch.stack(g_src).reshape(lead + source.shape[-1:]))


@pytest.mark.parametrize("lead,n,r,cls", [((2,), 23, 9, True), ((1, 3), 16, 6, False), ((2,), 40, 20, False)])
def test_hybrid_matches_the_published_rule(backend, lead, n, r, cls):
    g = torch.Generator().manual_seed(n)
    metric = torch.randn(lead + (n, 4), generator=g)
    metric[..., 5, :] = metric[..., 3, :]  # twin B tokens: the lower takes the sources of both
    x = torch.randn(lead + (n, 5), generator=g)
    size = torch.randint(1, 5, lead + (n, 1), generator=g).float()
    source = torch.rand(lead + (n, n + 3), generator=g) > 0.7
    plan = vt.match(metric, r, class_token=cls, backend=backend)
    threshold = float(plan.src_score[torch.isfinite(plan.src_score)].median())
    hybrid = vt.match(metric, r, class_token=cls, mode="hybrid", threshold=threshold, backend=backend)
    for field in ("out_idx", "src_idx", "dst_idx", "unm_idx"):
        assert torch.equal(getattr(hybrid, field), getattr(plan, field))
    assert not hybrid.dst_kept.all() and hybrid.dst_kept.any()
    want_x, want_s, want_src = _published_hybrid(x, size, source, plan, threshold)
    y, s = hybrid.merge(x, size)
    torch.testing.assert_close(y.double(), want_x, atol=1e-5, rtol=1e-5)
    assert torch.equal(s.double(), want_s)
    assert torch.equal(hybrid.merge_source(source), want_src.bool())
    _, s1 = hybrid.merge(x)  # unit sizes count the original patches each token holds
    assert torch.equal(hybrid.merge_source().sum(-1, keepdim=True), s1)


# -- TimeSformer proportional attention ------------------------------------------------------
def _attention_by_hand(qkv, heads, scale, bias=None):
    """Context [G, N, C] of softmax(q·kᵀ·scale + bias)·v from the qkv projection [G, N, 3C];
    bias [G, N, N] (query row, key) or None."""
    g, n, c3 = qkv.shape
    q, k, v = qkv.double().reshape(g, n, 3, heads, c3 // 3 // heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        logits = logits + bias[:, None].double()
    p = logits.softmax(-1)
    return (p @ v).transpose(1, 2).reshape(g, n, c3 // 3), p


def test_timesformer_size_bias_pattern():
    """Published pattern: log(size) only in the spatial attention, only on the patch tokens'
    query rows (the class token's row unbiased); none in the temporal attention."""
    pytest.importorskip("transformers")
    from patch_models import build

    model, x, patch, _ = build("timesformer")
    patch(model, r=[6, 0, 0])  # block 0 merges; block 1 attends over tokens of unequal sizes
    layer = model.timesformer.encoder.layer[1]
    seen, handles = {}, []
    for name, att in (("temporal", layer.temporal_attention), ("spatial", layer.attention)):
        handles.append(att.attention.qkv.register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name + " qkv", out)))
        handles.append(att.output.register_forward_pre_hook(
            lambda m, a, name=name: seen.__setitem__(name + " context", a[0])))
    handles.append(layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("size", model._vt.size)))
    with torch.no_grad():
        probs = model(x, output_attentions=True).attentions[1]
    for h in handles:
        h.remove()
    sa = layer.attention.attention
    size = seen["size"]  # [b, t, n', 1]
    b, t, n = size.shape[:3]
    assert size.max() > 1 and size.min() == 1

    # Temporal attention: over the t frames of each of the b·n' slots, unbiased.
    ctx, _ = _attention_by_hand(seen["temporal qkv"], sa.num_heads, sa.scale)
    torch.testing.assert_close(seen["temporal context"].double(), ctx, atol=1e-5, rtol=1e-5)
    slot_bias = size.log().permute(0, 2, 3, 1).reshape(b * n, 1, t).expand(b * n, t, t)
    biased, _ = _attention_by_hand(seen["temporal qkv"], sa.num_heads, sa.scale, slot_bias)
    assert (biased - ctx).abs().max() > 1e-3  # a bias here would have shown

    # Spatial attention: [cls, n' patches] of every frame; bias on rows 1: and columns 1:.
    key_bias = size.log().reshape(b * t, 1, n)
    bias = torch.zeros(b * t, 1 + n, 1 + n)
    bias[:, 1:, 1:] = key_bias.expand(b * t, n, n)
    ctx, p = _attention_by_hand(seen["spatial qkv"], sa.num_heads, sa.scale, bias)
    torch.testing.assert_close(seen["spatial context"].double(), ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.double(), p, atol=1e-5, rtol=1e-5)
    bias[:, :1, 1:] = key_bias  # the class token's row biased too: not what runs
    fuller, _ = _attention_by_hand(seen["spatial qkv"], sa.num_heads, sa.scale, bias)
    assert (fuller[:, 0] - ctx[:, 0]).abs().max() > 1e-3


# -- layer choice -----------------------------------------------------------------------------
def _vivit_by_hand(model, x, layer, steps):
    """ViViT with the video paper's layer choice, written out: before block ``layer``, one
    keys-only step per entry of steps but the last (the block's keys of its LayerNorm'd
    input, mean over heads; merge; nothing else), then the block with proportional attention
    and its own merge of steps[-1]. Returns (logits, tokens entering every block then the
    final count, tokens seen by every key projection)."""
    vivit = model.vivit
    h, size, entering, keyed = vivit.embeddings(x), None, [], []

    def heads(t, a):
        return t.reshape(t.shape[0], t.shape[1], a.num_attention_heads, -1).transpose(1, 2)

    for i, blk in enumerate(vivit.layers):
        a = blk.attention
        entering.append(h.shape[1])
        for r in (steps[:-1] if i == layer else []):
            if r == 0:  # a step that merges nothing changes nothing
                continue
            keyed.append(h.shape[1])
            keys = heads(a.k_proj(blk.layernorm_before(h)), a)
            h, size = vt.merge(h, size, r, metric=keys.mean(1), class_token=True, backend="reference")
        y = blk.layernorm_before(h)
        keyed.append(h.shape[1])
        q, k, v = heads(a.q_proj(y), a), heads(a.k_proj(y), a), heads(a.v_proj(y), a)
        logits = q @ k.transpose(-2, -1) * a.scaling
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        ctx = (logits.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        h = h + a.o_proj(ctx)
        if i == layer:
            h, size = vt.merge(h, size, steps[-1], metric=k.mean(1), class_token=True, backend="reference")
        h = h + blk.mlp(blk.layernorm_after(h))
    entering.append(h.shape[1])
    return model.classifier(vivit.layernorm(h)[:, 0]), entering, keyed


def _run_counting_keys(model, x):
    """(logits, tokens seen by every call of the ViViT's key projections) of one forward."""
    keyed = []
    handles = [blk.attention.k_proj.register_forward_hook(lambda m, a, out: keyed.append(a[0].shape[1]))
               for blk in model.vivit.layers]
    try:
        with torch.no_grad():
            logits = model(x).logits
    finally:
        for h in handles:
            h.remove()
    return logits, keyed


@pytest.mark.parametrize("layer,r", [(1, 5), (0, [4, 0, 6]), (2, (4, -1.0)), (1, [0, 3, 0])])
def test_layer_choice_matches_a_loop_over_vivit(layer, r):
    pytest.importorskip("transformers")
    from patch_models import build

    model, x, patch, _ = build("vivit")  # 33 tokens (class + 32 tubelets), 3 blocks
    steps = vt.schedule.layer_r(r, 3)
    with torch.no_grad():
        want, want_entering, want_keyed = _vivit_by_hand(model, x, layer, steps)
    patch(model, r=r, layer=layer, backend="reference")
    logits, keyed = _run_counting_keys(model, x)
    assert keyed == want_keyed  # one key projection per nonzero step, then the block's own
    assert vt.patch.token_counts(model, x.shape) == want_entering
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_layer_choice_token_counts_on_the_vivit_b_grid():
    """ViViT-B's grid (32 frames at 224, tubelets 2x16x16: 3137 tokens), r=300 in layer 0,
    on a narrow model: the published 3137 -> 2837 -> ... -> 437 -> 219 -> 110 inside block 0
    (each step clamped to half), 56 after its own merge."""
    pytest.importorskip("transformers")
    from transformers import VivitConfig, VivitForVideoClassification

    torch.manual_seed(0)
    cfg = VivitConfig(hidden_size=16, num_attention_heads=1, intermediate_size=16, num_labels=2)
    model = VivitForVideoClassification(cfg).eval()
    vt.patch.vivit(model, r=300, layer=0)
    x = torch.randn(1, 32, 3, 224, 224)
    _, keyed = _run_counting_keys(model, x)
    chain = [3137 - 300 * i for i in range(10)] + [219, 110]
    assert keyed == chain + [56] * 11
    assert vt.patch.token_counts(model, x.shape) == [3137] + [56] * 12
    unmerged = vt.patch.flops(model, x.shape, 0)
    assert vt.patch.flops(model, x.shape) < unmerged / 10  # 11 of 12 blocks on 56 tokens


@pytest.mark.parametrize("family", ["timm", "videomae", "timesformer"])
def test_keys_only_step_uses_the_blocks_own_keys(family):
    """Every family's keys-only step merges by the keys its block's attention computes
    (qkv projection of the LayerNorm'd tokens, as the block's forward does it)."""
    pytest.importorskip("timm" if family == "timm" else "transformers")
    from patch_models import blocks, build

    model, x, patch, _ = build(family)
    patch(model, r=2, layer=1, backend="reference")
    st, blk = model._vt, blocks(model)[1]
    seen = []
    h = blk.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()),
                                      with_kwargs=True)
    with torch.no_grad():
        model(x)
        h.remove()
        tokens = seen[0]  # what block 1 receives; now replay its first keys-only step
        st.size = start = st.entries[1][0]  # the sizes block 1 started from
        got = st.keys_step(blk, tokens, 2)
        st.size = start
        if family == "timm":
            a = blk.attn
            qkv = a.qkv(blk.norm1(tokens)).reshape(tokens.shape[0], tokens.shape[1], 3, a.num_heads, -1)
            metric = a.k_norm(qkv[:, :, 1].transpose(1, 2)).mean(1)
            want = st.merge(1, tokens, metric, 2)
        elif family == "videomae":
            sa = blk.attention.attention
            k = sa.key(blk.layernorm_before(tokens))
            want = st.merge(1, tokens, k.reshape(k.shape[0], k.shape[1], sa.num_attention_heads, -1).mean(2), 2)
        else:
            sa, t = blk.attention.attention, blk.config.num_frames
            b, length, c = tokens.shape
            n = (length - 1) // t
            frames = tokens[:, 1:].reshape(b, n, t, c).transpose(1, 2)
            with_cls = torch.cat((tokens[:, :1, None].expand(b, t, 1, c), frames), dim=2).reshape(b * t, n + 1, c)
            qkv = sa.qkv(blk.layernorm_before(with_cls)).reshape(b * t, n + 1, 3, sa.num_heads, -1)
            metric = qkv[:, 1:, 1].mean(2).reshape(b, t, n, -1)  # the patch tokens' keys
            merged = st.merge(1, frames, metric, 2)
            want = torch.cat((tokens[:, :1], merged.transpose(1, 2).reshape(b, -1, c)), dim=1)
    assert got.shape[1] < tokens.shape[1]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
