"""Every model patch on tiny random models: exactness at r=0, the token counts each block
sees, training, idempotence, options and errors (issue 5)."""

from __future__ import annotations

import copy

import pytest
import torch

import vtome_kernels as vt
from patch_models import blocks, build, logits, record_block_lengths
from vtome_kernels.patch.common import state_hooks

FAMILIES = list(vt.patch.FAMILIES)  # every declared family runs this suite
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    pytest.importorskip(vt.patch.FAMILIES[request.param].package)
    return request.param


def seen_lengths(model, x):
    """Sequence length entering every block, and the output length of the last, via hooks."""
    seen, handles = record_block_lengths(model)
    last = []
    handles.append(blocks(model)[-1].register_forward_hook(
        lambda m, a, out: last.append((out[0] if isinstance(out, tuple) else out).shape[1])))
    try:
        with torch.no_grad():
            logits(model, x)
    finally:
        for h in handles:
            h.remove()
    return seen + last


def test_r0_equals_unpatched(family):
    model, x, patch, _ = build(family)
    with torch.no_grad():
        want = logits(model, x)
        patch(model, r=0)
        got = logits(model, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("r", [2, [3, 0, 1], (2, -1.0), (2, 1.0)])
def test_lengths_follow_schedule(family, r):
    model, x, patch, _ = build(family)
    patch(model, r=r)
    want = vt.patch.token_counts(model, x.shape)
    assert seen_lengths(model, x) == want
    assert want[-1] < want[0]


def test_lengths_clamped_to_half(family):
    model, x, patch, _ = build(family)
    patch(model, r=1000)
    seen = seen_lengths(model, x)
    assert seen == vt.patch.token_counts(model, x.shape)
    assert all(b >= (a + 1) // 2 for a, b in zip(seen, seen[1:]))


def test_layer_choice_merges_only_in_that_block(family):
    model, x, patch, _ = build(family)
    patch(model, r=2, layer=1)
    seen = seen_lengths(model, x)
    assert seen == vt.patch.token_counts(model, x.shape)
    assert seen[0] == seen[1] and seen[1] > seen[2] and seen[2] == seen[3]


def test_training_step_reaches_patch_embedding(family):
    model, x, patch, embed = build(family)
    patch(model, r=2)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = logits(model, x).square().mean()
    loss.backward()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()


def test_patch_twice_changes_nothing(family):
    model, x, patch, _ = build(family)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [id(m) for m in model.modules()]
    patch(model, r=2)
    classes = [type(b) for b in blocks(model)]
    hooks = state_hooks(model, model._vt)
    with torch.no_grad():
        once = logits(model, x)
    patch(model, r=2)
    assert [type(b) for b in blocks(model)] == classes
    assert state_hooks(model, model._vt) == hooks
    assert [id(m) for m in model.modules()] == ids
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), once, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_remove_restores(family):
    model, x, patch, _ = build(family)
    with torch.no_grad():
        want = logits(model, x)
    classes = [type(b) for b in blocks(model)]
    patch(model, r=3)
    vt.patch.remove(model)
    assert [type(b) for b in blocks(model)] == classes
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), want, rtol=0, atol=0)


@pytest.mark.parametrize("opts", [dict(mode="drop"), dict(mode="random_merge"), dict(mode="random_drop"),
                                  dict(mode="hybrid", threshold=0.0), dict(metric="concat"),
                                  dict(prop_attn=False), dict(prop_attn=True)])
def test_options_run(family, opts):
    model, x, patch, _ = build(family)
    patch(model, r=2, **opts)
    assert seen_lengths(model, x) == vt.patch.token_counts(model, x.shape)
    with torch.no_grad():
        assert torch.isfinite(logits(model, x)).all()


def test_trace_source_covers_every_patch(family):
    model, x, patch, _ = build(family)
    patch(model, r=2, trace_source=True)
    with torch.no_grad():
        logits(model, x)
    src = vt.patch.source(model)
    state = model._vt
    # Every original token sits in exactly one current token; sizes count them.
    torch.testing.assert_close(src.sum(-2), torch.ones_like(src.sum(-2)))
    torch.testing.assert_close(src.sum(-1, keepdim=True), state.size)
    if state.scheme == "st" and state.protected:  # the class token stays alone at row 0
        assert src[:, 0, 0].eq(1).all() and src[:, 0].sum(-1).eq(1).all()


def test_merging_changes_output_and_follows_r(family):
    model, x, patch, _ = build(family)
    patch(model, r=0)
    with torch.no_grad():
        base = logits(model, x)
        model.r = 3
        merged = logits(model, x)
        model.r = 0
        again = logits(model, x)
    assert not torch.allclose(base, merged)
    torch.testing.assert_close(again, base, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(r=-1), ValueError, "r must be >= 0"),
    (dict(r=[1, 1, 1, 1]), ValueError, "4 entries but the model has 3 layers"),
    (dict(r=2, mode="shuffle"), ValueError, "mode must be one of"),
    (dict(r=2, metric="max"), ValueError, "metric must be one of"),
    (dict(r=2, layer=3), ValueError, "layer must be in [0, 2]"),
    (dict(r=2, prop_attn=1), TypeError, "prop_attn must be a bool"),
    (dict(r=2, mode="hybrid"), TypeError, "threshold must be a float"),
    (dict(r=1.5), TypeError, "r must be an int"),
])
def test_bad_arguments(family, kwargs, err, words):
    model, x, patch, _ = build(family)
    with pytest.raises(err, match=pytest.importorskip("re").escape(words)):
        patch(model, **kwargs)


def test_failed_repatch_keeps_options(family):
    model, x, patch, _ = build(family)
    patch(model, r=2, mode="drop")
    with pytest.raises(ValueError):
        patch(model, r=-1, mode="merge")
    assert model._vt.mode == "drop" and model.r == 2


def test_bad_r_attribute_fails_at_forward(family):
    model, x, patch, _ = build(family)
    patch(model, r=1)
    model.r = -2
    with pytest.raises(ValueError, match="r must be >= 0"):
        logits(model, x)


def test_wrong_model_type(family):
    model, x, patch, _ = build(family)
    with pytest.raises(TypeError, match="model must be"):
        patch(torch.nn.Linear(2, 2), r=1)


def test_deepcopy_of_a_patched_model(family):
    """A copy merges on its own state: its r is its own, the original is untouched."""
    model, x, patch, _ = build(family)
    patch(model, r=0)
    twin = copy.deepcopy(model)
    twin.r = 2
    with torch.no_grad():
        base = logits(model, x)
        merged = logits(twin, x)
    assert twin._vt.tokens == vt.patch.token_counts(twin, x.shape)[:-1]
    assert model._vt.tokens == vt.patch.token_counts(model, x.shape)[:-1]
    assert not torch.allclose(base, merged)
    vt.patch.remove(twin)
    assert state_hooks(model, model._vt)  # removing the copy's patch leaves the original's
    with torch.no_grad():
        torch.testing.assert_close(logits(twin, x), base, rtol=0, atol=1e-5)


def enable_checkpointing(model, family, reentrant, monkeypatch):
    if family == "timm":
        import timm.layers.config

        monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", reentrant)
        model.set_grad_checkpointing(True)
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})


def train_step(model, x):
    """Loss, every parameter's gradient, the token counts and source map of one step."""
    model.zero_grad(set_to_none=True)
    loss = logits(model, x).square().mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, list(model._vt.tokens), vt.patch.source(model)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("r", [2, (2, -1.0)])
def test_gradient_checkpointing_with_merging(family, reentrant, r, monkeypatch):
    """A block recomputed in backward replays the merge it made in forward: the loss and
    every gradient are those without checkpointing; the state is the forward's."""
    model, x, patch, _ = build(family)
    patch(model, r=r, trace_source=True)
    model.train()
    want = train_step(model, x)
    enable_checkpointing(model, family, reentrant, monkeypatch)
    st = model._vt
    entered = []
    enter = st.enter
    st.enter = lambda i, n: entered.append(i) or enter(i, n)
    got = train_step(model, x)
    depth = len(blocks(model))
    assert sorted(entered) == sorted(list(range(depth)) * 2)  # every block ran again in backward
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    assert got[1].keys() == want[1].keys() and len(got[1]) == sum(p.requires_grad for p in model.parameters())
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=0, atol=1e-5, msg=k)
    assert got[2] == want[2] == vt.patch.token_counts(model, x.shape)[:-1]
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=0)
    torch.testing.assert_close(st.size, want[3].sum(-1, keepdim=True))


def test_a_block_run_twice_on_other_tokens_is_an_error(family):
    model, x, patch, _ = build(family)
    patch(model, r=2)
    with torch.no_grad():
        logits(model, x)
        blk = blocks(model)[1]
        with pytest.raises(RuntimeError, match="only activation checkpointing"):
            blk(torch.randn(x.shape[0], model._vt.tokens[1] + 1, 32))


# -- output_attentions / output_hidden_states of the Hugging Face patches ----------------------
HF = [name for name, f in vt.patch.FAMILIES.items() if f.package == "transformers"]


def hf_build(family, impl="eager"):
    pytest.importorskip("transformers")
    model, x, patch, _ = build(family)
    if family != "timesformer":  # TimeSformer's attention is always eager
        model.set_attn_implementation(impl)
    return model, x, patch


def attention_rows(model, x, counts):
    """(tokens per attention row, groups) every block's attention should have: the whole
    sequence for the spatio-temporal patches, class + n per frame for TimeSformer."""
    st = model._vt
    if st.scheme == "dst":
        t = st.grid[0]
        return [((n - 1) // t + 1, x.shape[0] * t) for n in counts]
    return [(n, x.shape[0]) for n in counts]


@pytest.mark.parametrize("family", HF)
def test_attentions_at_r0_equal_unpatched(family):
    model, x, patch = hf_build(family)
    with torch.no_grad():
        want = model(x, output_attentions=True).attentions
        patch(model, r=0)
        got = model(x, output_attentions=True).attentions
    assert len(want) == len(got) == len(blocks(model))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", HF)
@pytest.mark.parametrize("prop_attn", [True, False])
def test_attentions_follow_the_merged_tokens(family, prop_attn):
    model, x, patch = hf_build(family)
    patch(model, r=[3, 2, 0], prop_attn=prop_attn)
    with torch.no_grad():
        out = model(x, output_attentions=True, output_hidden_states=True)
    counts = vt.patch.token_counts(model, x.shape)
    assert [h.shape[1] for h in out.hidden_states] == counts
    assert len(out.attentions) == len(blocks(model))
    for a, (n, g) in zip(out.attentions, attention_rows(model, x, counts)):
        assert a.shape == (g, model.config.num_attention_heads, n, n)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


@pytest.mark.parametrize("family", ["videomae", "vivit"])
def test_attentions_are_the_ones_used(family):
    """Eager and sdpa give the same logits when merging (the size bias is in both), and the
    recorded probabilities of block 2 are softmax(q k^T / sqrt(d) + log size) of its input."""
    model, x, patch = hf_build(family)
    patch(model, r=[3, 2, 0], prop_attn=True)
    with torch.no_grad():
        out = model(x, output_attentions=True, output_hidden_states=True)
        size = model._vt.size  # nothing merges after block 1
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(x).logits, out.logits, rtol=0, atol=1e-5)
        blk = blocks(model)[2]
        sa = blk.attention.attention if family == "videomae" else blk.attention
        qp, kp = (sa.query, sa.key) if family == "videomae" else (sa.q_proj, sa.k_proj)
        y = blk.layernorm_before(out.hidden_states[2])
        q, k = (vt.patch.common.heads_split(p(y), model.config.num_attention_heads) for p in (qp, kp))
        want = ((q @ k.transpose(-2, -1)) * sa.scaling + size.log()[:, None, None, :, 0]).softmax(-1)
    torch.testing.assert_close(out.attentions[2], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", HF)
def test_no_attentions_without_eager(family, monkeypatch):
    """sdpa (and TimeSformer without output_attentions): no probabilities are computed or
    returned, as for the unpatched model."""
    import importlib

    model, x, patch = hf_build(family, "sdpa")
    flag = {} if family == "timesformer" else dict(output_attentions=True)
    with torch.no_grad():
        want = model(x, **flag).attentions
        patch(model, r=2)
        mod = importlib.import_module(f"vtome_kernels.patch.{family}")
        calls = []

        def spy(*a, probs=False, **kw):
            calls.append(probs)
            return vt.patch.common.attend(*a, probs=probs, **kw)

        monkeypatch.setattr(mod, "attend", spy)
        got = model(x, **flag).attentions
    assert want in (None, ()) and got == want
    assert calls and not any(calls)


@pytest.mark.parametrize("family", HF)
def test_hidden_states_follow_the_merged_tokens(family):
    model, x, patch = hf_build(family, "sdpa")
    with torch.no_grad():
        want = model(x, output_hidden_states=True).hidden_states
        patch(model, r=0)
        same = model(x, output_hidden_states=True).hidden_states
        model.r = 2
        merged = model(x, output_hidden_states=True).hidden_states
    for a, b in zip(same, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert [h.shape[1] for h in merged] == vt.patch.token_counts(model, x.shape)


def test_torch_compile_of_a_patched_model(family):
    """torch.compile runs a patched model (graph breaks allowed) with the eager outputs and
    the schedule's token counts."""
    model, x, patch, _ = build(family)
    patch(model, r=2)
    with torch.no_grad():
        want = logits(model, x)
        got = logits(torch.compile(model, backend="eager"), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert model._vt.tokens == vt.patch.token_counts(model, x.shape)[:-1]


def test_fused_merge_path_equals_plan_path(family):
    """Without trace_source a block merges through vt.merge (one fused call on CPU); with it,
    through vt.match + plan.merge. Same tokens, same sizes, same logits."""
    model, x, patch, _ = build(family)
    patch(model, r=2)
    with torch.no_grad():
        fast = logits(model, x)
        fast_size = model._vt.size.clone()
        patch(model, r=2, trace_source=True)
        plan = logits(model, x)
    torch.testing.assert_close(fast, plan, rtol=0, atol=0)
    torch.testing.assert_close(fast_size, model._vt.size, rtol=0, atol=0)
