"""Public token merging: ``match`` builds a plan, ``merge`` matches and merges in one call.

Shapes: ``[B, N, C]`` is the spatio-temporal scheme (one matching per clip); ``[B, T, N, C]``
the divided space-time scheme (one matching per frame, r per frame, frame axis kept).
Inside, both are flattened to G matching groups and handed to a backend (``backends.py``).
Semantics: ALGORITHM.md section 1; contract: API.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _checks, graph, reference
from .backends import resolve

MODES = ("merge", "drop", "random_merge", "random_drop", "hybrid")


class MergePlan:
    """One matching of N tokens per group, to apply to x, size, source maps or to undo.

    Index fields have the leading dims of the metric ([B] or [B, T]) first and hold token
    positions 0..N-1 of the input: ``src_idx`` the r sources (best first), ``dst_idx`` the
    B token each source was matched to, ``unm_idx`` the unmerged A tokens in output order.
    In the drop modes ``merged`` is False: those sources are discarded rather than merged
    into ``dst_idx``. In hybrid mode every source merges, and ``dst_kept`` is False where
    the destination's own content is discarded (a source into it scored under the threshold).
    """

    def __init__(self, lead, n, r, *, mode, backend, class_token, distill_token, tensors,
                 dst_kept=None):
        self.lead, self.n, self.r = tuple(lead), n, r
        self.mode, self.backend = mode, backend
        self.class_token, self.distill_token = class_token, distill_token
        # Flat [G, ...] tensors: out_idx, src_idx, dst_pos, src_score, src_merged (or None).
        self._out_idx, self._src_idx, self._dst_pos, self._src_score, self._src_merged = tensors
        self._dst_kept = dst_kept  # [G, r] bool or None (every destination keeps its content)
        # What the merge kernels are given: the matching itself, or for hybrid its rewrite.
        self._apply = (self._out_idx, self._src_idx, self._dst_pos, self._src_merged)
        if dst_kept is not None:
            self._apply = _drop_destinations(self._out_idx, self._src_idx, self._dst_pos, dst_kept)

    def __repr__(self) -> str:
        return (
            f"MergePlan(lead={self.lead}, n={self.n}, r={self.r}, mode={self.mode!r}, "
            f"class_token={self.class_token}, distill_token={self.distill_token})"
        )

    # -- inspection ---------------------------------------------------------------------
    @property
    def n_out(self) -> int:
        """Tokens per group after the merge."""
        return self.n - self.r

    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.lead + (t.shape[-1],))

    @property
    def src_idx(self) -> torch.Tensor:
        return self._shaped(self._src_idx)

    @property
    def dst_idx(self) -> torch.Tensor:
        return self._shaped(self._out_idx.gather(1, self._dst_pos))

    @property
    def unm_idx(self) -> torch.Tensor:
        rows = self._out_idx
        if rows.shape[0] == 0:  # an empty batch: no row to read the layout from
            return self._shaped(rows[:, : (self.n + 1) // 2 - self.r])
        return self._shaped(rows[:, rows[0] % 2 == 0])  # A tokens sit at even positions

    @property
    def out_idx(self) -> torch.Tensor:
        """For every output token, the input position it starts from."""
        return self._shaped(self._out_idx)

    @property
    def src_score(self) -> torch.Tensor:
        """Each source's best similarity (random in the random modes), float32."""
        return self._shaped(self._src_score)

    @property
    def merged(self) -> torch.Tensor:
        """Per source: True if it merges into its destination, False if discarded."""
        if self._src_merged is None:
            return self._shaped(torch.ones_like(self._src_idx, dtype=torch.bool))
        return self._shaped(self._src_merged)

    @property
    def dst_kept(self) -> torch.Tensor:
        """Per source: True if its destination's own content stays in the merged token;
        False (hybrid only) where some source into that destination scored under the
        threshold, so the token becomes the size-weighted mean of its sources alone."""
        if self._dst_kept is None:
            return self._shaped(torch.ones_like(self._src_idx, dtype=torch.bool))
        return self._shaped(self._dst_kept)

    # -- application --------------------------------------------------------------------
    def _flat(self, name: str, t: torch.Tensor, last: Optional[int]) -> torch.Tensor:
        _checks.same_device(**{name: t, "the plan's metric": self._out_idx})
        _checks.leading(name, t, self.lead + (self.n,), last, "the metric plus N")
        return t.reshape((-1, self.n, t.shape[-1]))

    def merge(self, x: torch.Tensor, size: Optional[torch.Tensor] = None):
        """Merge x [..., N, C] and its sizes [..., N, 1] -> ([..., N - r, C], [..., N - r, 1]).

        Sizes default to ones (float32); returned sizes keep the given size dtype. In the
        drop modes the returned sizes are all ones.
        """
        _checks.tensor("x", x, (len(self.lead) + 2,))
        xf = self._flat("x", x, None)
        if size is None:
            size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
        else:
            _checks.tensor("size", size, (len(self.lead) + 2,))
            sf = self._flat("size", size, 1)
            _checks.sizes("size", sf)
        if self.r == 0:
            return x, size
        module = resolve(self.backend, "merge", x.device)
        out_x, out_s = module.merge(xf, size.reshape(xf.shape[:2] + (1,)), *self._apply)
        if self.mode in ("drop", "random_drop"):
            out_s = torch.ones_like(out_s)
        shape = self.lead + (self.n_out,)
        return out_x.reshape(shape + (x.shape[-1],)), out_s.reshape(shape + (1,))

    def merge_source(self, source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Merge a 0/1 map [..., N, N0] of original tokens; None starts from the identity."""
        if source is None:
            eye = torch.eye(self.n, device=self._out_idx.device)
            source = eye.expand(self.lead + (self.n, self.n))
        else:
            _checks.tensor("source", source, (len(self.lead) + 2,), _checks.FLOAT_DTYPES + (torch.bool,))
        flat = self._flat("source", source, None)
        if self.r == 0:
            return source
        module = resolve(self.backend, "merge_source", source.device)
        out = module.merge_source(flat, *self._apply)
        return out.reshape(self.lead + (self.n_out, source.shape[-1]))

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Scatter y [..., N - r, C] back to [..., N, C]; a source gets its destination's row."""
        _checks.tensor("y", y, (len(self.lead) + 2,), _checks.FLOAT_DTYPES)
        _checks.same_device(y=y, **{"the plan's metric": self._out_idx})
        _checks.leading("y", y, self.lead + (self.n_out,), None, "the metric plus N - r")
        if self.r == 0:
            return y
        module = resolve(self.backend, "unmerge", y.device)
        flat = y.reshape((-1, self.n_out, y.shape[-1]))
        out = module.unmerge(flat, self._out_idx, self._src_idx, self._dst_pos, self.n)
        return out.reshape(self.lead + (self.n, y.shape[-1]))


def match(
    metric: torch.Tensor,
    r: int,
    *,
    class_token: bool = False,
    distill_token: bool = False,
    mode: str = "merge",
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> MergePlan:
    """Bipartite soft matching of metric [B, N, d] (one group a clip) or [B, T, N, d] (a frame).

    r is clamped per group to (N - protected) // 2. The metric is L2-normalised inside and
    never modified; the matching carries no gradient. Random modes draw their scores from
    ``generator`` and are matched by the reference (there is no similarity to fuse).
    """
    _checks.tensor("metric", metric, (3, 4))
    r = _checks.count("r", r)
    _check_flags(class_token, distill_token, mode, threshold, generator)
    resolve(backend, "match", metric.device)  # an unknown or unusable backend fails here

    lead, n, d = tuple(metric.shape[:-2]), metric.shape[-2], metric.shape[-1]
    if d == 0:
        raise ValueError(f"metric must have a last dim >= 1, got shape {tuple(metric.shape)}")
    r = min(r, (int(n) - int(class_token) - int(distill_token)) // 2)
    flat = metric.detach().reshape(-1, n, d)
    kw = dict(mode=mode, backend=backend, class_token=class_token, distill_token=distill_token)
    if r <= 0:
        return MergePlan(lead, n, 0, tensors=_identity(flat), **kw)

    if mode in ("random_merge", "random_drop"):
        device = generator.device if generator is not None else flat.device
        scores = torch.rand(flat.shape[0], (n + 1) // 2, n // 2, generator=generator, device=device)
        scorer = graph if graph.exporting() else reference  # no aten.sort.stable in a graph
        tensors = scorer.match_scores(scores.to(flat.device), r, class_token, distill_token)
    else:
        tensors = resolve(backend, "match", flat.device).match(flat, r, class_token, distill_token)
    out_idx, src_idx, dst_pos, src_score = tensors
    src_merged = dst_kept = None
    if mode in ("drop", "random_drop"):
        src_merged = torch.zeros_like(src_idx, dtype=torch.bool)
    elif mode == "hybrid":
        dst_kept = _kept_destinations(dst_pos, src_score >= threshold, n - r)
    return MergePlan(lead, n, r, tensors=(out_idx, src_idx, dst_pos, src_score, src_merged),
                     dst_kept=dst_kept, **kw)


def _kept_destinations(dst_pos, passed, n_out: int) -> torch.Tensor:
    """Hybrid (the video paper's rule): a destination keeps its own content only if every
    source matched to it scored >= threshold (a product over its sources). Per source [G, r]."""
    kept_rows = torch.ones(dst_pos.shape[0], n_out, dtype=torch.uint8, device=dst_pos.device)
    kept_rows = kept_rows.scatter_reduce(1, dst_pos, passed.to(torch.uint8), reduce="amin")
    return kept_rows.gather(1, dst_pos).bool()


def _drop_destinations(out_idx, src_idx, dst_pos, dst_kept):
    """The matching rewritten so that the ordinary merge kernels drop the destinations'
    own content where ``dst_kept`` is False: the output row's first source (in rank order)
    becomes its base token and the destination takes that source's slot as a discarded
    source. The row is then the size-weighted mean of its sources alone, summed in the
    same order as before (first source, then the others in rank order), its source-map
    row their union; sizes stay positive, as every kernel requires.
    Returns (out_idx, src_idx, dst_pos, src_merged)."""
    g, r = src_idx.shape
    rank = torch.arange(r, device=src_idx.device).expand(g, r)
    first = torch.full_like(out_idx, r).scatter_reduce(1, dst_pos, rank, reduce="amin")
    swap = (first.gather(1, dst_pos) == rank) & ~dst_kept  # [G, r]: the row's first source
    row_dropped = torch.zeros_like(out_idx, dtype=torch.bool).scatter(1, dst_pos, ~dst_kept)
    first_src = src_idx.gather(1, first.clamp_max(r - 1))
    new_out = torch.where(row_dropped, first_src, out_idx)
    new_src = torch.where(swap, out_idx.gather(1, dst_pos), src_idx)
    return new_out, new_src, dst_pos, ~swap


def _check_flags(class_token, distill_token, mode, threshold, generator) -> None:
    """The matching options of match and merge."""
    _checks.flag("class_token", class_token)
    _checks.flag("distill_token", distill_token)
    if distill_token and not class_token:
        raise ValueError("distill_token=True needs class_token=True (cls at 0, distillation at 1)")
    _checks.mode_threshold(mode, threshold, MODES)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _identity(flat: torch.Tensor):
    """The tensors of a plan that merges nothing."""
    g, n, _ = flat.shape
    empty = torch.empty(g, 0, dtype=torch.long, device=flat.device)
    out_idx = torch.arange(n, device=flat.device).expand(g, n)
    return out_idx, empty, empty, empty.float(), None


def merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    r: int,
    *,
    metric: Optional[torch.Tensor] = None,
    class_token: bool = False,
    distill_token: bool = False,
    mode: str = "merge",
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge r tokens per group of x [B, N, C] (spatio-temporal) or [B, T, N, C] (per frame).

    Returns (x, size) with N - r' tokens, r' = min(r, (N - protected) // 2); metric=None
    matches x itself. Size-weighted mean in float32, output in x's dtype; differentiable in x.
    Mode "merge" is one call of the backend's fused match+merge stage; the other modes
    build a plan (``match``) and apply it.
    """
    _checks.tensor("x", x, (3, 4))
    if metric is None:
        metric = x
    else:
        _checks.tensor("metric", metric, (3, 4))
        _checks.same_device(x=x, metric=metric)
        _checks.leading("metric", metric, x.shape[:-1], None, "x")
    if size is not None:
        _checks.tensor("size", size, (x.dim(),))
        _checks.same_device(x=x, size=size)
        _checks.leading("size", size, x.shape[:-1], 1, "x")
    if mode != "merge":
        plan = match(metric, r, class_token=class_token, distill_token=distill_token, mode=mode,
                     threshold=threshold, generator=generator, backend=backend)
        return plan.merge(x, size)
    r = _checks.count("r", r)
    _check_flags(class_token, distill_token, mode, threshold, generator)
    module = resolve(backend, "merge_fused", x.device)
    n, c, d = x.shape[-2], x.shape[-1], metric.shape[-1]
    if d == 0:
        raise ValueError(f"metric must have a last dim >= 1, got shape {tuple(metric.shape)}")
    r = min(r, (int(n) - int(class_token) - int(distill_token)) // 2)
    if r <= 0:
        if size is None:
            size = torch.ones(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
        else:
            _checks.sizes("size", size)
        return x, size
    if metric.requires_grad:  # the matching carries no gradient (a detach costs ~3 us)
        metric = metric.detach()
    if x.dim() == 3:  # [B, N, C] is one group a clip already
        return module.merge_fused(x, size, metric, r, class_token, distill_token)
    out_x, out_s = module.merge_fused(
        x.reshape(-1, n, c), None if size is None else size.reshape(-1, n, 1),
        metric.reshape(-1, n, d), r, class_token, distill_token)
    lead = x.shape[:-2] + (n - r,)
    return out_x.reshape(lead + (c,)), out_s.reshape(lead + (1,))
