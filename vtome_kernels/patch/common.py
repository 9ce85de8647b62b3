"""What every model patch shares: options, the per-forward merge state, attention with
size bias, the merge step of a block, and the class swap that makes a patch idempotent.

A patch swaps the class of each transformer block for a subclass whose ``forward`` runs
ALGORITHM.md section 3 (attention -> residual -> merge of this layer's r -> MLP). The
module objects and their weights stay as they are. A forward pre-hook on the embedding
module resets the state (sizes, source map, the r of every layer) at the start of every
forward, so it works however the model is entered (``forward``, ``forward_features``, ...).
Every block forward goes through ``MergeState.enter`` / ``leave``: a block called again
before the next forward (activation checkpointing recomputing it in backward) replays its
first call from the state recorded then, and changes nothing.
The r schedule is read from ``model.r`` at that moment (int, per-layer list or
(r, inflect), see ``vtome_kernels.schedule``). With ``layer=L`` (layer choice, as the
video paper's code runs it) the schedule's entries become successive merge steps inside
block L: all but the last are keys-only steps before the block (block L's keys from
LayerNorm(tokens), no attention output, no residual: ``MergeState.pre_merge``), the last is
the block's own merge after its attention.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _checks
from ..attention import prop_attention
from ..merge import MODES, match
from ..merge import merge as merge_tokens
from ..schedule import layer_r

METRICS = ("mean", "concat")
POSITIONS = ("dst", "mean")  # how a merged token's rotary (t, h, w) is chosen (MergeState.positions)


class CostModel:
    """Per-layer FLOPs of a model family from its token counts (see ``budget.py``).

    scheme "st": one sequence of N tokens per clip; "dst": T frames of n tokens each plus
    a class token set aside (TimeSformer's divided space-time block). pooler: the
    self-attention layers of an attentive pooler after the blocks (V-JEPA 2's head: those
    layers, then one query's cross-attention, all on the final tokens); None: no pooler.
    """

    def __init__(self, scheme: str, dim: int, mlp: int, heads: int, in_per_token: int,
                 frames: int = 1, pooler: Optional[int] = None):
        self.scheme, self.dim, self.mlp, self.heads = scheme, dim, mlp, heads
        self.in_per_token, self.frames, self.pooler = in_per_token, frames, pooler

    def embed(self, patches: int) -> float:
        """The patch embedding: a linear map of each patch's pixels."""
        return 2.0 * patches * self.in_per_token * self.dim

    def keys_step(self, n: int, r: int, metric_dim: int) -> float:
        """FLOPs of a keys-only merge step of layer choice on n tokens (per frame for "dst"):
        the key projection and the matching (the LayerNorm left out, as everywhere)."""
        match_flops = 2.0 * ((n + 1) // 2) * (n // 2) * metric_dim if r > 0 else 0.0
        per_frame = 2.0 * n * self.dim * self.dim + match_flops
        return per_frame if self.scheme == "st" else self.frames * per_frame

    def block(self, n: int, r: int, metric_dim: int) -> float:
        """FLOPs of one block entered by n tokens (per frame for "dst") merging r of them."""
        c, m = self.dim, self.mlp
        match_flops = 2.0 * ((n + 1) // 2) * (n // 2) * metric_dim if r > 0 else 0.0
        if self.scheme == "st":
            attn = 2.0 * (4 * n * c * c + 2 * n * n * c)
            return attn + match_flops + 2.0 * 2 * (n - r) * c * m
        t = self.frames
        temporal = 2.0 * (4 * n * t * c * c + 2 * n * t * t * c) + 2.0 * n * t * c * c
        spatial = 2.0 * (4 * t * (n + 1) * c * c + 2 * t * (n + 1) ** 2 * c)
        return temporal + spatial + t * match_flops + 2.0 * 2 * (1 + (n - r) * t) * c * m

    def head(self, n: int) -> float:
        """FLOPs of an attentive pooler on the n final tokens (0 without one): its
        self-attention layers as blocks, then the keys, values and one query's attention."""
        if self.pooler is None:
            return 0.0
        c = self.dim
        return self.pooler * self.block(n, 0, 0) + 2.0 * (2 * n * c * c + 2 * n * c)


class MergeState:
    """Options of a patched model and what one forward carries from block to block."""

    def __init__(self, family: str, depth: int, scheme: str, class_token: bool,
                 distill_token: bool, grid_of: Callable[[Tuple[int, ...]], Tuple[int, int, int]],
                 cost: CostModel, prefix: Optional[int] = None, rotary: bool = False):
        self.family, self.depth, self.scheme, self.rotary = family, depth, scheme, rotary
        self.class_token, self.distill_token = class_token, distill_token
        # Tokens in front that never merge (class, distillation, registers): vt.match itself
        # protects a class token at 0 and a distillation token at 1; a longer prefix is set
        # aside around the match.
        self.prefix = int(class_token) + int(distill_token) if prefix is None else prefix
        self.grid_of, self.cost = grid_of, cost
        self.owner: Optional[torch.nn.Module] = None  # the module whose .r is the schedule
        self.timing = False
        # Options (set by configure).
        self.mode, self.threshold, self.prop_attn = "merge", None, True
        self.metric, self.trace_source, self.layer, self.backend = "mean", False, None, "auto"
        self.weighted_pool = False
        self.select: Optional[int] = None  # FluxViT selection budget (video patches)
        self.select_groups = "auto"
        # Rotary families: how a merged token's position is chosen ("dst": its destination's,
        # "mean": the size-weighted mean of its patches'); None for the other families.
        self.position_merge: Optional[str] = None
        # Layer choice: (block, x, r) -> x after one keys-only merge step (set by install).
        self.keys_step: Optional[Callable] = None
        # Per forward: the r of each block's own merge, and of its keys-only steps before it.
        self.r_list: List[int] = [0] * depth
        self.pre_r: List[List[int]] = [[] for _ in range(depth)]
        self.size: Optional[torch.Tensor] = None
        self.source: Optional[torch.Tensor] = None
        self.grid: Optional[Tuple[int, int, int]] = None
        self.tokens: List[int] = []
        self.entries: Dict[int, tuple] = {}  # block -> (size, source, N) on first entry
        self.merge_seconds = 0.0
        self.last: Optional[torch.Tensor] = None
        self.kept: Optional[torch.Tensor] = None  # [B, K] positions kept by select
        # Rotary families: every token's (t, h, w) position [B, N, 3] float32, set by the
        # embedding and merged with the tokens (dst or mean); None until then.
        self.positions: Optional[torch.Tensor] = None

    @property
    def protected(self) -> int:
        """Tokens in front that never merge and keep size 1."""
        return self.prefix

    # -- options --------------------------------------------------------------------------
    def configure(self, *, mode, threshold, prop_attn, metric, trace_source, layer, backend, positions=None):
        _checks.mode_threshold(mode, threshold, MODES)
        if self.rotary:
            _checks.choice("positions", positions, POSITIONS)
        elif positions is not None:
            raise ValueError(f"positions is only for families with rotary positions, not {self.family}")
        _checks.flag("prop_attn", prop_attn)
        _checks.flag("trace_source", trace_source)
        _checks.choice("metric", metric, METRICS)
        if layer is not None:
            layer = _checks.count("layer", layer)
            if layer >= self.depth:
                raise ValueError(f"layer must be in [0, {self.depth - 1}] (the model's blocks), got {layer}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.mode, self.threshold, self.prop_attn = mode, threshold, prop_attn
        self.metric, self.trace_source, self.layer, self.backend = metric, trace_source, layer, backend
        self.position_merge = positions

    def steps(self, r) -> List[List[int]]:
        """The r of every merge step of every block, in order, for a schedule r (int, list,
        (r, inflect)) and the options; each block's last step is its own merge (after its
        attention), the ones before it keys-only steps.

        Without ``layer``: one step per block, the schedule's entry. With ``layer=L`` (the
        video paper's layer choice): block L takes all the schedule's entries as successive
        steps (zeros are steps that merge nothing), every other block merges nothing. Each
        step clamps its r to half the tokens, as every merge does.
        """
        rs = layer_r(r, self.depth)
        if self.layer is None:
            return [[v] for v in rs]
        out = [[0] for _ in range(self.depth)]
        out[self.layer] = rs
        return out

    def schedule(self, r) -> List[int]:
        """The r of every merge step, in the order they run (any(): does anything merge)."""
        return [v for block in self.steps(r) for v in block]

    def merging(self) -> bool:
        """Whether this forward merges anything."""
        return any(self.r_list) or any(map(any, self.pre_r))

    # -- per forward ------------------------------------------------------------------------
    def begin(self, input_shape: Tuple[int, ...]) -> None:
        """Reset at the start of a forward: read model.r, forget sizes and sources."""
        owner = self.owner
        r = getattr(owner, "r", 0) if owner is not None else 0
        steps = self.steps(r)
        self.r_list = [block[-1] for block in steps]
        self.pre_r = [block[:-1] for block in steps]
        self.size = self.source = self.last = self.kept = self.positions = None
        self.grid = self.grid_of(tuple(input_shape))
        self.tokens = []
        self.entries = {}
        self.merge_seconds = 0.0

    def enter(self, i: int, n: int):
        """Block i starts with n tokens. The first call in a forward records the state it
        starts from; a second one (activation checkpointing recomputing the block during
        backward) starts from that recorded state instead, so it makes the same merge.
        Returns what ``leave`` restores after a recompute (None after a first call)."""
        if i not in self.entries:
            self.entries[i] = (self.size, self.source, self.positions, n)
            self.tokens.append(n)
            return None
        size, source, positions, n0 = self.entries[i]
        if n != n0:
            raise RuntimeError(f"block {i} of a patched model ran again in the same forward with {n} tokens "
                               f"instead of {n0}: only activation checkpointing may call a block twice")
        saved = (self.size, self.source, self.positions, self.last, self.merge_seconds)
        self.size, self.source, self.positions = size, source, positions
        return saved

    def leave(self, saved) -> None:
        """After a recompute: put back the state of the forward (sizes, source map, ...)."""
        if saved is not None:
            self.size, self.source, self.positions, self.last, self.merge_seconds = saved

    def pre_merge(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Layer choice: the keys-only merge steps of a block before it runs (none unless
        it is the chosen layer). Each computes the block's keys from LayerNorm(x) and merges
        its r tokens with them; the attention output is not needed, there is no residual."""
        for r in self.pre_r[block._vt_index]:
            if r > 0:
                x = self.keys_step(block, x, r)
        return x

    def merge(self, i: int, x: torch.Tensor, metric: torch.Tensor, r: Optional[int] = None) -> torch.Tensor:
        """Block i's merge of x [B, N, C] (or [B, T, N, C] per frame) by its metric: its
        own (r None: this forward's r of block i) or a keys-only step's r."""
        if r is None:
            r = self.r_list[i] if i < len(self.r_list) else 0
        if r <= 0:
            return x
        t0 = time.perf_counter() if self.timing else 0.0
        p = self.prefix
        if p != int(self.class_token) + int(self.distill_token):  # a prefix vt.match cannot protect
            x = self._merge_after_prefix(x, metric, r, p)
        elif self.trace_source or self.mode != "merge" or self.positions is not None:
            # the plan is needed (source map, modes, positions)
            plan = match(metric, r, class_token=self.class_token, distill_token=self.distill_token,
                         mode=self.mode, threshold=self.threshold, backend=self.backend)
            if plan.r > 0:
                if self.trace_source:
                    self.source = plan.merge_source(self.source)
                if self.positions is not None:
                    self.positions = self._merged_positions(plan, self.positions, self.size)
                x, self.size = plan.merge(x, self.size)
        elif (x.shape[-2] - p) // 2 > 0:  # as the plan path: nothing to merge leaves size as it is
            # vt.merge: one call of the backend's fused match+merge stage (BENCHMARKS.md, C++
            # backend item 6: a third of the general path's per-call cost).
            x, self.size = merge_tokens(x, self.size, r, metric=metric, class_token=self.class_token,
                                        distill_token=self.distill_token, backend=self.backend)
        if self.timing:
            self.merge_seconds += time.perf_counter() - t0
        return x

    def _merge_after_prefix(self, x: torch.Tensor, metric: torch.Tensor, r: int, p: int) -> torch.Tensor:
        """Set the p prefix tokens aside, match and merge the rest, put the prefix back in
        front (size 1, its own rows of the source map)."""
        plan = match(metric[..., p:, :], r, mode=self.mode, threshold=self.threshold, backend=self.backend)
        if plan.r == 0:
            return x
        n = x.shape[-2]
        if self.trace_source:
            src = self.source
            if src is None:
                src = torch.eye(n, device=x.device).expand(x.shape[:-2] + (n, n))
            self.source = torch.cat((src[..., :p, :], plan.merge_source(src[..., p:, :])), dim=-2)
        size = self.size
        if size is None:
            size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
        if self.positions is not None:
            pos = self.positions
            pos_rest = self._merged_positions(plan, pos[..., p:, :], size[..., p:, :])
            self.positions = torch.cat((pos[..., :p, :], pos_rest), dim=-2)
        rest, rest_size = plan.merge(x[..., p:, :], size[..., p:, :])
        self.size = torch.cat((size[..., :p, :], rest_size.to(size.dtype)), dim=-2)
        return torch.cat((x[..., :p, :], rest), dim=-2)

    def _merged_positions(self, plan, positions: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """Positions [..., N, 3] after the plan's merge, from the plan (no pass over x):
        "dst" keeps each output token's own (its destination's for a merged one), "mean"
        the size-weighted mean of what merges (a discarded source, as in mode="drop",
        leaves its destination's as it is)."""
        if self.position_merge == "mean":
            return plan.merge(positions, size)[0]
        idx = plan.out_idx
        return positions.gather(-2, idx[..., None].expand(idx.shape + (positions.shape[-1],)))

    def key_metric(self, k: torch.Tensor) -> torch.Tensor:
        """The matching metric from keys [B, H, N, d]: mean over heads, or heads concatenated."""
        if self.metric == "mean":
            return k.mean(1)
        b, h, n, d = k.shape
        return k.transpose(1, 2).reshape(b, n, h * d)

    def attn_size(self) -> Optional[torch.Tensor]:
        """Key sizes for proportional attention, or None (plain attention)."""
        return self.size if self.prop_attn else None


def attend(q, k, v, size, scale: float, dropout_p: float, training: bool, backend: str,
           probs: bool = False, mask: Optional[torch.Tensor] = None):
    """Attention of q over k, v [B, H, N, d] with a log(size) bias per key (ALGORITHM.md 2).

    size None is the library's own plain attention (scaled_dot_product_attention), so an
    unmerged model computes exactly what it computed before the patch. probs=True (the
    eager attention of a Hugging Face config) computes it step by step and returns
    (context, probabilities), the probabilities with the size bias and dropout applied, as
    the unpatched eager attention returns them. Attention dropout while training also needs
    the probabilities. mask: an additive attention mask (only without merging).
    """
    if probs or (training and dropout_p > 0):
        logits = (q @ k.transpose(-2, -1)) * scale
        if size is not None:
            logits = logits + size.float().log()[:, None, None, :, 0].to(logits.dtype)
        if mask is not None:
            logits = logits + mask
        p = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        p = F.dropout(p, dropout_p, training=True) if training and dropout_p > 0 else p
        return (p @ v, p) if probs else p @ v
    if size is None or mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return prop_attention(q, k, v, size, scale=scale, backend=backend)


def st_keys_step(keys: Callable) -> Callable:
    """A spatio-temporal family's keys-only merge step from ``keys(block, x)`` -> the block's
    attention keys [B, H, N, d] of LayerNorm(x): its metric (mean or concat), then its merge."""
    def step(block: torch.nn.Module, x: torch.Tensor, r: int) -> torch.Tensor:
        st = block._vt_state
        return st.merge(block._vt_index, x, st.key_metric(keys(block, x)), r)

    return step


def eager(module: torch.nn.Module) -> bool:
    """Whether a Hugging Face attention module's config asks for eager attention (the one
    implementation that returns its probabilities; sdpa, flash, ... return None)."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None) == "eager"


# -- class swapping ---------------------------------------------------------------------------
_SUBCLASSES: Dict[Tuple[type, Callable], type] = {}


_ENTERED: Dict[Callable, Callable] = {}


def block_forward(forward: Callable) -> Callable:
    """A block's patched forward wrapped in MergeState.enter / leave (made once per forward):
    counts the tokens entering, and makes a checkpoint recompute replay the first call."""
    if forward not in _ENTERED:
        @functools.wraps(forward)
        def entered(self, *args, **kwargs):
            st = self._vt_state
            x = args[0] if args else next(iter(kwargs.values()))
            saved = st.enter(self._vt_index, x.shape[1])
            try:
                if st.pre_r[self._vt_index]:  # layer choice: merge steps before the block
                    x = st.pre_merge(self, x)
                    if args:
                        args = (x,) + args[1:]
                    else:
                        kwargs = {**kwargs, next(iter(kwargs)): x}
                return forward(self, *args, **kwargs)
            finally:
                st.leave(saved)

        _ENTERED[forward] = entered
    return _ENTERED[forward]


def patched_class(cls: type, forward: Callable, name: str = "forward") -> type:
    """A subclass of cls whose method ``name`` (forward) is ``forward`` (made once per class)."""
    if getattr(cls, "_vt_patched", False):
        return cls
    key = (cls, forward)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"VT{cls.__name__}", (cls,), {
            name: forward, "_vt_patched": True, "_vt_base": cls, "__module__": cls.__module__,
        })
    return _SUBCLASSES[key]


def find_state(blocks: Sequence[torch.nn.Module]) -> Optional[MergeState]:
    """The state of an already patched model, or None."""
    states = {id(getattr(b, "_vt_state", None)) for b in blocks}
    first = getattr(blocks[0], "_vt_state", None) if len(blocks) else None
    if first is not None and len(states) == 1:
        return first
    return None


def install(family, model: torch.nn.Module, r, options: dict, select=None,
            select_groups="auto") -> torch.nn.Module:
    """Patch a model of ``family`` (family.py): swap the classes of its blocks (and of the
    attention modules it names, the modules a Hugging Face model hooks to record
    ``output_attentions``: a block calls them as modules, so those hooks see the attention
    the patch computes), hook its embedding (state reset; class swap when the family
    supports select) once; (re)set options and r."""
    parts = family.parts(model)
    blocks = parts.blocks
    if len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to patch")
    state = find_state(blocks)
    fresh = state is None
    if fresh:
        state = MergeState(family.name, len(blocks), family.scheme, parts.class_token, parts.distill_token,
                           parts.grid_of, parts.cost, parts.prefix, rotary=family.rotary)
    before = dict(vars(state))
    try:
        state.configure(**options)
        check_select(select, select_groups)
        if select is not None and family.embed_forward is None:
            raise ValueError(f"select is not supported by the {state.family} patch")
        state.select, state.select_groups = select, select_groups
        state.schedule(r)  # a bad r fails now, not at the next forward
    except (TypeError, ValueError):
        vars(state).update(before)  # a failed re-patch leaves the options as they were
        raise
    if fresh:
        for i, block in enumerate(blocks):
            block._vt_state, block._vt_index = state, i
            block.__class__ = patched_class(type(block), block_forward(family.block_forward))
        embed = parts.embed
        embed.register_forward_pre_hook(BeginHook(state), with_kwargs=True)
        if family.embed_forward is not None:
            embed._vt_state = state
            embed.__class__ = patched_class(type(embed), family.embed_forward)
        for module, fwd in parts.attention:
            module._vt_state = state
            module.__class__ = patched_class(type(module), fwd)
    state.keys_step = family.keys_step
    parts.extra_hooks(state)
    state.owner = model
    model._vt = state
    model.r = r
    return model


class StateHook:
    """A hook holding its state as an attribute (not a closure), so that copy.deepcopy of a
    patched model gives hooks bound to the copy's state."""

    def __init__(self, state: MergeState):
        self.state = state


class BeginHook(StateHook):
    """Forward pre-hook of the embedding module: a new forward starts."""

    def __call__(self, module, args, kwargs):
        pixels = args[0] if args else next(iter(kwargs.values()), None)
        self.state.begin(tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else ())


def state_hooks(model: torch.nn.Module, state: MergeState):
    """(module, key) of every hook of this patch in model (found by scanning, so a deep
    copy of a patched model finds its own)."""
    found = []
    for module in model.modules():
        for key, hook in module._forward_pre_hooks.items():
            if isinstance(hook, StateHook) and hook.state is state:
                found.append((module, key))
    return found


def has_hook(module: torch.nn.Module, kind: type, state: MergeState) -> bool:
    return any(isinstance(h, kind) and h.state is state for h in module._forward_pre_hooks.values())


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo a patch: the blocks get their own classes back, the hooks go, ``model.r`` stays."""
    state = state_of(model)
    for module, key in state_hooks(model, state):
        del module._forward_pre_hooks[key]
        getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
    for module in model.modules():
        if getattr(module, "_vt_state", None) is state:
            module.__class__ = module.__class__._vt_base
            del module._vt_state
            module.__dict__.pop("_vt_index", None)
    del model._vt
    return model


def state_of(model: torch.nn.Module) -> MergeState:
    """The merge state of a patched model; a clear error otherwise."""
    state = getattr(model, "_vt", None)
    if not isinstance(state, MergeState):
        from . import FAMILIES

        raise ValueError(f"{type(model).__name__} is not patched by vtome_kernels: call "
                         f"vt.patch.{' / '.join(FAMILIES)} on it first")
    return state


def grid_from(shape: Tuple[int, ...], names: str, t_step: int, h_step: int, w_step: int,
              what: str) -> Tuple[int, int, int]:
    """Token grid (T', h, w) of an input of shape ``shape`` laid out as ``names``."""
    if len(shape) != len(names):
        raise ValueError(f"{what} input must be {len(names)}-D ({', '.join(names)}), got shape {shape}")
    dims = dict(zip(names, shape))
    t = dims.get("T", 1)
    return (max(t // t_step, 1) if "T" in dims else 1, dims["H"] // h_step, dims["W"] // w_step)


def heads_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d]."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def heads_join(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H*d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


# -- FluxViT selection at the input (select=K) ---------------------------------------------------
def check_select(select, groups) -> None:
    """select is None or a positive int budget; groups "auto" or a positive int."""
    if select is not None:
        _checks.count("select", select, minimum=1)
    if not (groups == "auto" or (isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1)):
        raise ValueError(f"select_groups must be 'auto' or an int >= 1, got {groups!r}")


def kept_tokens(state: MergeState, grid: Tuple[int, int, int]) -> int:
    """Patch tokens that reach the first block: all of the grid, or what select keeps."""
    t, h, w = grid
    n = t * h * w
    if state.select is None:
        return n
    from ..select import kept_count, resolve_groups

    return kept_count(state.select, t, h * w, resolve_groups(state.select_groups, t))


def select_tokens(state: MergeState, patches: torch.Tensor, pos: Optional[torch.Tensor], extra: int) -> torch.Tensor:
    """Keep state.select of patches [B, N, C] (scored without positions, as FluxViT does) and
    add the positional embeddings pos [N, C] of the kept positions (None: a family without
    additive positions, rotary ones come from ``state.kept``); records the kept index
    and, with trace_source, a source map over the extra (class) tokens and all N patches."""
    from ..select import select

    t, h, w = state.grid
    b, n, c = patches.shape
    kept, index = select(patches.reshape(b, t, h * w, c), state.select, groups=state.select_groups,
                         backend=state.backend)
    state.kept = index
    if state.trace_source:
        src = torch.zeros(b, extra + index.shape[1], extra + n, device=patches.device)
        if extra:
            src[:, :extra, :extra] = torch.eye(extra, device=patches.device)
        rows = torch.arange(extra, extra + index.shape[1], device=patches.device).expand(b, -1)
        src[torch.arange(b, device=patches.device)[:, None], rows, index + extra] = 1.0
        state.source = src
    return kept if pos is None else kept + pos.to(kept.dtype)[index]
