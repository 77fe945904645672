"""Many blocks as one batched call, and layer fusion (spec sections 2 and 3).

``stack_blocks(model, groups)`` turns G groups of layer indices into ``WideBlocks``: group g of M
layers becomes one wide block whose Q/K/V projections, MLP up-projections and output projections
are the M blocks' weights concatenated (M * n_head heads, hidden M * 4d, outputs summed). Every
weight carries a leading G axis, so one matmul per projection evaluates all G wide blocks, and
attention runs as a batch over (G, B). M = 1 is the block itself; G = 1, M = 1 is a single block
(views, no copies).

Hidden states have shape (B, T, n, D): n = mHC streams, n = 1 for nanochat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from .block import VE_GATE_CHANNELS
from .kv_cache import StackCache, cached_attention
from .layers import apply_rotary, causal_attention, rms_norm
from .mhc import ConnectionStack, stack_connections

if TYPE_CHECKING:
    from .gpt import GPT

QK_SCALE = 1.2  # nanochat sharpens attention by scaling the normed q and k


@dataclass
class BlockInputs:
    """What every block of one forward pass reads besides its input state.

    x0: (B, T, n, D) the (smeared) embedding, for the x0 blend; cos, sin: (T, hd/2) rotary tables
    of the positions being computed, or (B, T, hd/2) when rows sit at different positions;
    value_embeds: layer -> (B, T, Hkv * hd); positions: (B, T) absolute positions, needed by
    blocks that carry a KV cache.
    """

    x0: Tensor
    cos: Tensor
    sin: Tensor
    value_embeds: dict[int, Tensor]
    positions: Tensor | None = None
    _ve_stacks: dict = field(default_factory=dict)

    def value_embeds_for(self, layers: tuple[int | None, ...], batch: int) -> Tensor:
        """(G, batch, T, Hkv * hd): layer l's value embedding per group, zeros where None."""
        key = (layers, batch)
        if key not in self._ve_stacks:
            some = next(iter(self.value_embeds.values()))
            rows = [self.value_embeds[l] if l is not None else torch.zeros_like(some) for l in layers]
            self._ve_stacks[key] = repeat_batch(torch.stack(rows), batch, dim=1)
        return self._ve_stacks[key]


def repeat_batch(t: Tensor, batch: int, dim: int = 0) -> Tensor:
    """Tile t along ``dim`` up to ``batch`` rows (probe-doubled batches of the DiagN solver)."""
    reps = batch // t.size(dim)
    if reps == 1:
        return t
    sizes = [1] * t.dim()
    sizes[dim] = reps
    return t.repeat(*sizes)


@dataclass
class WideBlocks:
    """G wide blocks of M fused layers each, weights stacked on a leading G axis.

    wq: (G, Hq*hd, D), wk/wv: (G, Hkv*hd, D), wo: (G, D, Hq*hd), w_fc: (G, F, D), w_proj: (G, D, F),
    with Hq = M * n_head, Hkv = M * n_kv_head, F = M * 4D. lambdas: (G, 2) averaged (resid, x0)
    or None; ve_gate: (G, n_kv_head, 12) or None (only when M = 1). cache: None, or the static
    KV cache of these blocks' layers (read as (G, M, B, n_kv_head, Tmax, hd)) that attention
    writes to and reads from.
    """

    layers: tuple[tuple[int, ...], ...]
    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    w_fc: Tensor
    w_proj: Tensor
    head_dim: int
    windows: tuple[tuple[int, ...], ...]
    lambdas: Tensor | None = None
    ve_gate: Tensor | None = None
    ve_layers: tuple[int | None, ...] = ()
    hc_attn: ConnectionStack | None = None
    hc_mlp: ConnectionStack | None = None
    branch_scale: float = 1.0
    cache: StackCache | None = None

    @property
    def groups(self) -> int:
        return len(self.layers)

    def select(self, g: int) -> "WideBlocks":
        """Wide block g alone, as a G = 1 stack (views)."""
        return self.take(g, g + 1)

    def take(self, start: int, stop: int) -> "WideBlocks":
        """Wide blocks start .. stop - 1 as a stack of their own (views)."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        hc = lambda s: None if s is None else ConnectionStack(s.iters, s.tau, **{  # noqa: E731
            k: cut(getattr(s, k)) for k in ("pre", "post", "res", "phi_pre", "phi_post", "phi_res", "alpha", "b_pre", "b_post", "b_res")
        })
        return WideBlocks(
            layers=self.layers[start:stop], wq=cut(self.wq), wk=cut(self.wk), wv=cut(self.wv), wo=cut(self.wo),
            w_fc=cut(self.w_fc), w_proj=cut(self.w_proj), head_dim=self.head_dim, windows=self.windows[start:stop],
            lambdas=cut(self.lambdas), ve_gate=cut(self.ve_gate), ve_layers=self.ve_layers[start:stop],
            hc_attn=hc(self.hc_attn), hc_mlp=hc(self.hc_mlp), branch_scale=self.branch_scale,
            cache=None if self.cache is None else self.cache.take(start, stop),
        )


def _stack(groups: list[list[Tensor]], cat_dim: int) -> Tensor:
    """Concatenate each group's tensors along ``cat_dim``, stack the groups on a new axis 0."""
    per_group = [g[0] if len(g) == 1 else torch.cat(g, dim=cat_dim) for g in groups]
    return per_group[0].unsqueeze(0) if len(per_group) == 1 else torch.stack(per_group)


def stack_blocks(model: "GPT", groups: list[list[int]] | tuple, average_branches: bool = False) -> WideBlocks:
    """Stack (and fuse) the model's blocks: ``groups[g]`` lists the layers fused into wide block g.

    All groups must have the same size M. With M > 1 the resid / x0 lambdas are averaged and
    applied once to the chunk input, value embeddings are dropped, and mHC chunks use the mean of
    their blocks' H matrices; ``average_branches`` divides the summed branch outputs by M.
    """
    cfg = model.config
    groups = [list(g) for g in groups]
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"fusion groups must be non-empty and of one size, got sizes {sorted(sizes)}")
    fuse = sizes.pop()
    for g in groups:
        for layer in g:
            if not 0 <= layer < cfg.n_layer:
                raise ValueError(f"layer index {layer} out of range 0..{cfg.n_layer - 1}")
    blocks = [[model.transformer.h[layer] for layer in g] for g in groups]

    def gather(get: Callable, cat_dim: int) -> Tensor:
        return _stack([[get(b) for b in g] for g in blocks], cat_dim)

    windows_per_layer = model.window_sizes
    windows = tuple(tuple(windows_per_layer[layer] for layer in g for _ in range(cfg.n_head)) for g in groups)

    lambdas = None
    if cfg.uses_lambdas:
        per_layer = torch.stack([model.resid_lambdas, model.x0_lambdas], dim=-1)  # (L, 2)
        lambdas = torch.stack([per_layer[g].mean(0) for g in groups])

    ve_gate, ve_layers = None, tuple(None for _ in groups)
    if fuse == 1 and any(cfg.has_value_embedding(g[0]) for g in groups):
        ref = next(b[0].attn.ve_gate.weight for b in blocks if b[0].attn.ve_gate is not None)
        ve_gate = torch.stack([b[0].attn.ve_gate.weight if b[0].attn.ve_gate is not None else torch.zeros_like(ref) for b in blocks])
        ve_layers = tuple(g[0] if cfg.has_value_embedding(g[0]) else None for g in groups)

    hc_attn = hc_mlp = None
    if cfg.use_mhc:
        hc_attn = stack_connections([[b.hc_attn for b in g] for g in blocks], cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau)
        hc_mlp = stack_connections([[b.hc_mlp for b in g] for g in blocks], cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau)

    return WideBlocks(
        layers=tuple(tuple(g) for g in groups),
        wq=gather(lambda b: b.attn.c_q.weight, 0),
        wk=gather(lambda b: b.attn.c_k.weight, 0),
        wv=gather(lambda b: b.attn.c_v.weight, 0),
        wo=gather(lambda b: b.attn.c_proj.weight, 1),
        w_fc=gather(lambda b: b.mlp.c_fc.weight, 0),
        w_proj=gather(lambda b: b.mlp.c_proj.weight, 1),
        head_dim=cfg.head_dim,
        windows=windows,
        lambdas=lambdas,
        ve_gate=ve_gate,
        ve_layers=ve_layers,
        hc_attn=hc_attn,
        hc_mlp=hc_mlp,
        branch_scale=1.0 / fuse if average_branches else 1.0,
    )


def _project(x: Tensor, w: Tensor) -> Tensor:
    """x: (G, B, T, in), w: (G, out, in) -> (G, B, T, out); one batched matmul."""
    g, b, t, _ = x.shape
    return torch.bmm(x.reshape(g, b * t, -1), w.to(x.dtype).transpose(1, 2)).view(g, b, t, -1)


def _keys_values(blocks: WideBlocks, xn: Tensor, inputs: BlockInputs) -> tuple[Tensor, Tensor]:
    """k (rotated, normed, scaled) and v of the normed attention input xn (G, B, T, D): (G, B, T, Hkv, hd)."""
    g, b, t, _ = xn.shape
    hd = blocks.head_dim
    k = _project(xn, blocks.wk).view(g, b, t, -1, hd)
    v = _project(xn, blocks.wv).view(g, b, t, -1, hd)
    if blocks.ve_gate is not None:
        gate = 3 * torch.sigmoid(_project(xn[..., :VE_GATE_CHANNELS], blocks.ve_gate))  # (G, B, T, Hkv)
        ve = inputs.value_embeds_for(blocks.ve_layers, b).to(v.dtype).view(g, b, t, -1, hd)
        v = v + gate.unsqueeze(-1) * ve
    return rms_norm(apply_rotary(k, inputs.cos, inputs.sin)) * QK_SCALE, v


def attention_branch(blocks: WideBlocks, xn: Tensor, inputs: BlockInputs) -> Tensor:
    """Sum over the fused blocks of Attn_m(xn). xn: (G, B, T, D) normed input -> (G, B, T, D).

    With a KV cache the new k, v are written at ``inputs.positions`` and the queries attend over
    the cache; without one, over the T positions of this call.
    """
    g, b, t, _ = xn.shape
    q = _project(xn, blocks.wq).view(g, b, t, -1, blocks.head_dim)
    q = rms_norm(apply_rotary(q, inputs.cos, inputs.sin)) * QK_SCALE
    k, v = _keys_values(blocks, xn, inputs)
    if blocks.cache is not None:
        blocks.cache.write(k, v, inputs.positions)
        y = cached_attention(q, blocks.cache.keys(), blocks.cache.values(), inputs.positions, blocks.windows)
        return _project(y.reshape(g, b, t, -1), blocks.wo)
    y = causal_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), blocks.windows)
    return _project(y.transpose(2, 3).reshape(g, b, t, -1), blocks.wo)


def mlp_branch(blocks: WideBlocks, xn: Tensor) -> Tensor:
    """Sum over the fused blocks of MLP_m(xn) = c_proj(relu(c_fc xn)^2). (G, B, T, D) -> same."""
    return _project(torch.relu(_project(xn, blocks.w_fc)).square(), blocks.w_proj)


def _branch_input(x: Tensor, hc: ConnectionStack | None) -> tuple[Tensor, tuple | None]:
    """The normed branch input (G, B, T, D) of a sub-layer on x (G, B, T, n, D), and the mHC
    coefficients (H_pre, H_post, H_res) it was pooled with (None for nanochat's single stream)."""
    if hc is None:
        return rms_norm(x[..., 0, :]), None
    pre, post, res = hc.coefficients(x)
    return rms_norm((pre.unsqueeze(-1) * x).sum(-2)), (pre, post, res)  # norm(H_pre . X)


def _sublayer(x: Tensor, hc: ConnectionStack | None, branch: Callable[[Tensor], Tensor], scale: float):
    """One residual sub-layer on x (G, B, T, n, D); returns (x', H_res or None)."""
    xn, coefficients = _branch_input(x, hc)
    out = branch(xn)
    if scale != 1.0:
        out = out * scale
    if coefficients is None:  # nanochat: x + branch(norm(x)) on the single stream
        return x + out.unsqueeze(-2), None
    _, post, res = coefficients
    return torch.matmul(res, x) + post.unsqueeze(-1) * out.unsqueeze(-2), res


def blend_input(blocks: WideBlocks, x: Tensor, inputs: BlockInputs) -> Tensor:
    """lambda_res * x + lambda_x0 * x0 for lambda models (identity otherwise). x: (G, B, T, n, D)."""
    if blocks.lambdas is None:
        return x
    lam = blocks.lambdas.to(x.dtype)[:, None, None, None, None, :]  # (G, 1, 1, 1, 1, 2)
    return lam[..., 0] * x + lam[..., 1] * repeat_batch(inputs.x0, x.size(1)).unsqueeze(0)


def write_keys_values(blocks: WideBlocks, x: Tensor, inputs: BlockInputs) -> None:
    """Write into the blocks' KV cache the k, v their attention computes from the inputs x
    (G, B, T, n, D), at ``inputs.positions``: the attention half of ``wide_block_forward`` up to the
    kv projections, without queries, attention or MLP."""
    xn, _ = _branch_input(blend_input(blocks, x, inputs), blocks.hc_attn)
    k, v = _keys_values(blocks, xn, inputs)
    blocks.cache.write(k, v, inputs.positions)


def wide_block_forward(blocks: WideBlocks, x: Tensor, inputs: BlockInputs) -> tuple[Tensor, Tensor | None]:
    """Evaluate G wide blocks in one call.

    x: (G, B, T, n, D), the input state of each wide block (before the lambda blend).
    Returns (F(x) of shape (G, B, T, n, D), A) where A is the HC surrogate Jacobian
    H_res_mlp @ H_res_attn of shape (G, b, t, n, n) for mHC (b = t = 1 when static), else None.
    """
    x = blend_input(blocks, x, inputs)
    x, res_attn = _sublayer(x, blocks.hc_attn, lambda xn: attention_branch(blocks, xn, inputs), blocks.branch_scale)
    x, res_mlp = _sublayer(x, blocks.hc_mlp, lambda xn: mlp_branch(blocks, xn), blocks.branch_scale)
    surrogate = None if res_attn is None else torch.matmul(res_mlp, res_attn)
    return x, surrogate
