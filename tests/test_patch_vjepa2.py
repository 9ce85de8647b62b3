"""V-JEPA 2 (issue 15): rotary positions carried by the tokens through merges and
selection, checked against the unpatched layers run with ``position_mask``; the attentive
pooler's size bias; the predictor guard; the cost model. The generic suite
(test_patch_models.py) runs V-JEPA 2 as well: r=0, counts, options, checkpointing, compile."""

from __future__ import annotations

import copy

import pytest
import torch

import vtome_kernels as vt
from patch_models import build, logits

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tiny():
    """(unpatched model, input): every test patches a deep copy."""
    model, x, _, _ = build("vjepa2")
    return model, x


def patched(tiny, **opts):
    model, x = tiny
    return vt.patch.vjepa2(copy.deepcopy(model), **opts), x


def encoder_out(model, x):
    with torch.no_grad():
        return model.vjepa2(x, skip_predictor=True).last_hidden_state


def index_positions(ids, g):
    """(t, h, w) of token ids, written out from the model's get_position_ids."""
    return torch.stack((ids // (g * g), (ids % (g * g)) // g, ids % g), dim=-1).float()


def test_select_equals_the_models_masked_input_path(tiny):
    """select=K: the patched encoder's output is the unpatched layers run on the kept
    tokens with position_mask = the kept indices (the model's own masked-input path)."""
    base, x = tiny
    model, _ = patched(tiny, r=0, select=10)
    got = encoder_out(model, x)
    kept = model._vt.kept
    assert torch.equal(kept, vt.select(base.vjepa2.encoder.embeddings(x).reshape(2, 2, 16, -1), 10)[1])
    from transformers.models.vjepa2.modeling_vjepa2 import apply_masks

    enc = base.vjepa2.encoder
    with torch.no_grad():
        h = apply_masks(enc.embeddings(x), [kept])
        for layer in enc.layer:
            h = layer(h, position_mask=kept)[0]
        want = enc.layernorm(h)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert model._vt.tokens == vt.patch.token_counts(model, x.shape)[:-1] == [10, 10, 10]


@pytest.mark.parametrize("r", [[3, 2, 4], 5])
@pytest.mark.parametrize("select", [None, 20])
def test_drop_with_destination_positions_equals_a_position_mask_loop(tiny, r, select):
    """mode="drop", positions="dst": an independently written loop over the unpatched
    modules (attention run with position_mask = the ids of the tokens still there, the
    matching on the keys before rotation, the kept rows taken, then the MLP) gives the
    patched encoder's output."""
    base, x = tiny
    model, _ = patched(tiny, r=r, mode="drop", positions="dst", select=select)
    got = encoder_out(model, x)
    enc = base.vjepa2.encoder
    rs = vt.schedule.layer_r(r, 3)
    with torch.no_grad():
        h = enc.embeddings(x)
        ids = torch.arange(h.shape[1]).expand(2, -1)
        if select is not None:
            ids = model._vt.kept
            h = h.gather(1, ids[..., None].expand(-1, -1, h.shape[-1]))
        for layer, rr in zip(enc.layer, rs):
            y = layer.norm1(h)
            h = h + layer.attention(y, position_mask=ids)[0]
            keys = layer.attention.key(y).view(2, h.shape[1], 2, -1).mean(2)  # heads averaged, no rotation
            out = vt.match(keys, rr, mode="drop").out_idx
            h = h.gather(1, out[..., None].expand(-1, -1, h.shape[-1]))
            ids = ids.gather(1, out)
            h = h + layer.mlp(layer.norm2(h))
        want = enc.layernorm(h)
    assert got.shape == want.shape and got.shape[1] < (select or 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(model._vt.positions, index_positions(ids, 4), rtol=0, atol=0)


def test_index_positions_are_the_models():
    from transformers.models.vjepa2.modeling_vjepa2 import VJEPA2RopeAttention

    model, _, _, _ = build("vjepa2")
    attn = model.vjepa2.encoder.layer[0].attention
    assert type(attn) is VJEPA2RopeAttention
    ids = torch.randperm(64)[:20].expand(3, -1)
    f, h, w = attn.get_position_ids(ids[..., None], masks=ids)
    want = torch.stack((f[:, 0], h[:, 0], w[:, 0]), -1).float()
    from vtome_kernels.patch.vjepa2 import index_positions as library

    torch.testing.assert_close(library(ids, 4), want, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [None, 1])
@pytest.mark.parametrize("positions", ["dst", "mean"])
def test_positions_after_merging(tiny, positions, layer):
    """"mean": every token's position is the size-weighted mean of its patches' (source map
    times the original positions over the size); "dst": one of its own patches'. Also with
    layer choice (keys-only merge steps before block 1 carry the positions too)."""
    model, x = patched(tiny, r=[6, 4, 3], positions=positions, trace_source=True, layer=layer)
    with torch.no_grad():
        logits(model, x)
    st = model._vt
    src, size, pos = vt.patch.source(model), st.size, st.positions
    pos0 = index_positions(torch.arange(32).expand(2, -1), 4)
    assert pos.shape == (2, 32 - 13, 3) and pos.dtype == torch.float32
    if positions == "mean":
        torch.testing.assert_close(pos, src @ pos0 / size, rtol=0, atol=1e-5)
        assert (pos != pos.round()).any()  # some merged tokens sit between patches
    else:
        member = (pos[:, :, None, :] == pos0[:, None, :, :]).all(-1) & (src > 0)
        assert member.any(-1).all()


def test_positions_drive_rope(tiny):
    """The positions the tokens carry are the ones rotated: giving every token another
    position after the first merge changes the output; giving them back restores it."""
    model, x = patched(tiny, r=[4, 0, 0])
    st = model._vt
    with torch.no_grad():
        for layer in model.vjepa2.encoder.layer:  # random weights attend almost uniformly: sharpen
            layer.attention.query.weight.mul_(20)
            layer.attention.key.weight.mul_(20)
        want = encoder_out(model, x)
        merge = type(st).merge

        def shifted(i, y, metric):
            out = merge(st, i, y, metric)
            if i == 0:
                st.positions = st.positions.flip(1)  # RoPE is relative: a shift of all would change nothing
            return out

        st.merge = shifted
        moved = encoder_out(model, x)
        del st.merge
        again = encoder_out(model, x)
    assert (moved - want).abs().amax() > 1e-3 * want.abs().amax()
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_bf16_r0_equals_unpatched(tiny):
    base, x = tiny
    base = copy.deepcopy(base).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        want = logits(base, xb)
        vt.patch.vjepa2(base, r=0)
        got = logits(base, xb)
        base.r = 3
        merged = logits(base, xb)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert merged.dtype == torch.bfloat16 and torch.isfinite(merged).all()


def test_pooler_size_bias(tiny):
    """pool_prop_attn: the pooler's attention over merged tokens gets log(size) on its keys
    (checked by hand for its self-attention and cross-attention); off: plain attention."""
    on, x = patched(tiny, r=[6, 4, 3], pool_prop_attn=True)
    off, _ = patched(tiny, r=[6, 4, 3], pool_prop_attn=False)
    with torch.no_grad():
        a, b = logits(on, x), logits(off, x)
        hidden = encoder_out(on, x)
        size = on._vt.size
        assert not torch.allclose(a, b)
        pooler = on.pooler

        def attn(q, k, v, heads):
            q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
            w = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + size.log()[:, None, None, :, 0]
            return (w.softmax(-1) @ v).transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])

        h = hidden
        for layer in pooler.self_attention_layers:
            sa = layer.self_attn
            y = layer.layer_norm1(h)
            h = h + sa.out_proj(attn(sa.q_proj(y), sa.k_proj(y), sa.v_proj(y), sa.num_heads))
            h = h + layer.mlp(layer.layer_norm2(h))
        cl = pooler.cross_attention_layer
        q = pooler.query_tokens.repeat(2, 1, 1)
        y = cl.layer_norm1(h)
        z = q + attn(cl.cross_attn.q_proj(q), cl.cross_attn.k_proj(y), cl.cross_attn.v_proj(y), cl.cross_attn.num_heads)
        z = z + cl.mlp(cl.layer_norm2(z))
        want = on.classifier(z.squeeze(1))
    torch.testing.assert_close(a, want, rtol=0, atol=1e-5)


def test_predictor_refuses_merged_tokens(tiny):
    """VJEPA2Model: at r=0 the predictor runs as unpatched; after a merge or a selection it
    refuses (its positions would be the token index), skip_predictor=True works."""
    base, x = tiny
    bare = copy.deepcopy(base.vjepa2)
    with torch.no_grad():
        want = bare(x).predictor_output.last_hidden_state
        vt.patch.vjepa2(bare, r=0)
        torch.testing.assert_close(bare(x).predictor_output.last_hidden_state, want, rtol=0, atol=1e-6)
        bare.r = 2
        with pytest.raises(ValueError, match="skip_predictor=True"):
            bare(x)
        assert bare(x, skip_predictor=True).last_hidden_state.shape[1] == vt.patch.token_counts(bare, x.shape)[-1]
        vt.patch.vjepa2(bare, r=0, select=8)
        with pytest.raises(ValueError, match="skip_predictor=True"):
            bare(x)


def test_flops_hand_count(tiny):
    """Unpatched FLOPs of the tiny V-JEPA 2 with its pooler, counted from its sizes."""
    model, x = patched(tiny, r=0)
    n, c, m, depth = 32, 32, 64, 3
    block = 2 * (4 * n * c * c + 2 * n * n * c) + 2 * 2 * n * c * m
    embed = 2 * n * (3 * 2 * 8 * 8) * c
    pooler = block + 2 * (2 * n * c * c + 2 * n * c)  # one self-attention layer, then the cross-attention
    assert vt.patch.flops(model, (1, 4, 3, 32, 32)) == embed + depth * block + pooler
    bare, _ = tiny
    bare = vt.patch.vjepa2(copy.deepcopy(bare.vjepa2), r=0)  # no pooler
    assert vt.patch.flops(bare, (1, 4, 3, 32, 32)) == embed + depth * block
    model.r = 4
    counts = vt.patch.token_counts(model, x.shape)
    assert counts == [32, 28, 24, 20]
    with_select = vt.patch.vjepa2(model, r=4, select=12)
    assert vt.patch.token_counts(with_select, x.shape) == [12, 8, 4, 2]


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(positions="max"), ValueError, "positions must be one of"),
    (dict(pool_prop_attn=1), TypeError, "pool_prop_attn must be a bool"),
])
def test_errors(tiny, kwargs, err, words):
    with pytest.raises(err, match=words):
        patched(tiny, r=1, **kwargs)


def test_other_families_take_no_positions():
    pytest.importorskip("timm")
    model, _, patch, _ = build("videomae")
    with pytest.raises(TypeError, match="unexpected keyword"):
        patch(model, r=1, positions="dst")


def test_positions_benchmark_runs(tmp_path):
    """The training benchmark behind BENCHMARKS.md's table, for two steps."""
    from benchmarks import vjepa2_positions as bench

    x, y = bench.clips(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 8, 3, 32, 32) and y.shape == (4,) and int(y.max()) < 8
    block = bench.run(steps=2, batch=4, held_out=8, rs=(4,), settings=[("mean", True, False), ("index", False, True)])
    assert "| unpatched |" in block and "r=4" in block
    assert "| size-weighted mean of the patches' (t, h, w) | on | off |" in block
    assert "| re-derived from the token index (positions ignored) | off | on |" in block
