"""The mHC family: nanochat's blocks joined by manifold-constrained hyper-connections.

The hidden state has n streams, X (B, T, n, D). A sub-layer with connection (H_pre, H_post, H_res)
maps it to

    X' = H_res @ X + H_post[:, None] * branch(norm(H_pre @ X))

with nanochat's attention and MLP as the branches (``nanochat.WideBlocks``). A block's surrogate
Jacobian for HCN is A = H_res_mlp @ H_res_attn, acting on the stream axis.

Static variant (the paper's): the three come from learned logits (softmax, softmax, Sinkhorn).
Dynamic variant (DeepSeek's): they come from the RMS-normed flattened input,
``alpha * (x' phi) + b``, with sigmoid, 2 * sigmoid and Sinkhorn. A fused chunk of M blocks uses
the mean of its blocks' H matrices.

Initialisation, on top of nanochat's table: H_res logits 0 on the diagonal and -0.5 elsewhere
(near identity after Sinkhorn), H_pre logits 0 on stream (2 l + sub-layer) mod n and -1 elsewhere,
H_post logits 0; dynamic: phi normal with std (n D)^-0.5, alpha 0.01, biases as the static logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from .kv_cache import KVCache
from .nanochat import GPT, Block, BlockInputs, WideBlocks, rms_norm


def sinkhorn_log(logits: Tensor, iters: int, tau: float) -> Tensor:
    """Doubly stochastic projection of (..., n, n) logits, in log space.

    Z = logits / tau; iters times u = -logsumexp(Z + v, -1), v = -logsumexp(Z + u, -2);
    returns exp(Z + u + v): columns sum to 1 exactly, rows approximately.
    """
    z = logits / tau
    u = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    v = torch.zeros_like(u)
    for _ in range(iters):
        u = -torch.logsumexp(z + v.unsqueeze(-2), dim=-1)
        v = -torch.logsumexp(z + u.unsqueeze(-1), dim=-2)
    return torch.exp(z + u.unsqueeze(-1) + v.unsqueeze(-2))


def _initial_logits(n: int, init_stream: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits that start H_res near identity and H_pre near one-hot on ``init_stream``."""
    res = torch.full((n, n), -0.5)
    res.fill_diagonal_(0.0)
    pre = torch.full((n,), -1.0)
    pre[init_stream] = 0.0
    return res, pre, torch.zeros(n)


class StaticHyperConnection(nn.Module):
    """The paper's mHC connection of one sub-layer; parameter names match nanochat's."""

    def __init__(self, n: int, init_stream: int):
        super().__init__()
        self.init_stream = init_stream
        res, pre, post = _initial_logits(n, init_stream)
        self.H_res_logits = nn.Parameter(res)
        self.H_pre_logits = nn.Parameter(pre)
        self.H_post_logits = nn.Parameter(post)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        res, pre, post = _initial_logits(self.H_pre_logits.numel(), self.init_stream)
        self.H_res_logits.copy_(res)
        self.H_pre_logits.copy_(pre)
        self.H_post_logits.copy_(post)

    def matrices(self, iters: int, tau: float) -> tuple[Tensor, Tensor, Tensor]:
        """(H_pre (n,), H_post (n,), H_res (n, n))."""
        return (
            F.softmax(self.H_pre_logits, dim=-1),
            F.softmax(self.H_post_logits, dim=-1),
            sinkhorn_log(self.H_res_logits, iters, tau),
        )


class DynamicHyperConnection(nn.Module):
    """DeepSeek's dynamic mHC connection of one sub-layer: coefficients depend on the input."""

    def __init__(self, n: int, d: int, init_stream: int):
        super().__init__()
        self.n, self.init_stream = n, init_stream
        self.phi_pre = nn.Parameter(torch.empty(n, n * d))
        self.phi_post = nn.Parameter(torch.empty(n, n * d))
        self.phi_res = nn.Parameter(torch.empty(n * n, n * d))
        self.alpha = nn.Parameter(torch.empty(3))  # gates of the pre, post, res projections
        res, pre, post = _initial_logits(n, init_stream)
        self.b_res = nn.Parameter(res)
        self.b_pre = nn.Parameter(pre)
        self.b_post = nn.Parameter(post)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.phi_pre.size(1) ** -0.5
        for phi in (self.phi_pre, self.phi_post, self.phi_res):
            nn.init.normal_(phi, std=std)
        self.alpha.fill_(0.01)
        res, pre, post = _initial_logits(self.n, self.init_stream)
        self.b_res.copy_(res)
        self.b_pre.copy_(pre)
        self.b_post.copy_(post)


@dataclass
class ConnectionStack:
    """The connections of G groups of M sub-layers, ready to evaluate on a (G, B, T, n, D) state.

    Static: ``pre`` (G, n), ``post`` (G, n), ``res`` (G, n, n), already averaged over each group.
    Dynamic: ``phi_*`` (G, M, k, n*D), ``alpha`` (G, M, 3), ``b_*`` (G, M, ...); averaged at use.
    """

    iters: int
    tau: float
    pre: Tensor | None = None
    post: Tensor | None = None
    res: Tensor | None = None
    phi_pre: Tensor | None = None
    phi_post: Tensor | None = None
    phi_res: Tensor | None = None
    alpha: Tensor | None = None
    b_pre: Tensor | None = None
    b_post: Tensor | None = None
    b_res: Tensor | None = None

    @property
    def dynamic(self) -> bool:
        return self.phi_pre is not None

    def take(self, start: int, stop: int) -> "ConnectionStack":
        """Groups start .. stop - 1 (views)."""
        cut = {k: getattr(self, k) for k in ("pre", "post", "res", "phi_pre", "phi_post", "phi_res", "alpha", "b_pre", "b_post", "b_res")}
        return ConnectionStack(self.iters, self.tau, **{k: None if v is None else v[start:stop] for k, v in cut.items()})

    def coefficients(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (G, B, T, n, D) -> H_pre (G, b, t, n), H_post (G, b, t, n), H_res (G, b, t, n, n).

        b, t are 1 for the static variant (broadcast) and B, T for the dynamic one.
        """
        dt = x.dtype
        if not self.dynamic:
            return (self.pre.to(dt)[:, None, None], self.post.to(dt)[:, None, None], self.res.to(dt)[:, None, None])
        n = x.size(-2)
        flat = rms_norm(x.flatten(-2))  # (G, B, T, n*D)

        def project(phi: Tensor, gate: Tensor, bias: Tensor) -> Tensor:
            # (G, M, k, nD) x (G, B, T, nD) -> (G, M, B, T, k)
            proj = torch.einsum("gmkc,gbtc->gmbtk", phi.to(dt), flat)
            return gate.to(dt)[:, :, None, None, None] * proj + bias.to(dt).flatten(2)[:, :, None, None, :]

        pre = torch.sigmoid(project(self.phi_pre, self.alpha[..., 0], self.b_pre)).mean(1)
        post = (2 * torch.sigmoid(project(self.phi_post, self.alpha[..., 1], self.b_post))).mean(1)
        res_logits = project(self.phi_res, self.alpha[..., 2], self.b_res)
        res = sinkhorn_log(res_logits.unflatten(-1, (n, n)), self.iters, self.tau).mean(1)
        return pre, post, res


def stack_connections(groups: list[list[nn.Module]], iters: int, tau: float) -> ConnectionStack:
    """Stack G groups of M connections (same variant) into one ConnectionStack (autograd-preserving)."""
    first = groups[0][0]
    if isinstance(first, StaticHyperConnection):
        mats = [[hc.matrices(iters, tau) for hc in group] for group in groups]
        return ConnectionStack(
            iters,
            tau,
            pre=torch.stack([torch.stack([m[0] for m in g]).mean(0) for g in mats]),
            post=torch.stack([torch.stack([m[1] for m in g]).mean(0) for g in mats]),
            res=torch.stack([torch.stack([m[2] for m in g]).mean(0) for g in mats]),
        )

    def gather(name: str) -> Tensor:
        return torch.stack([torch.stack([getattr(hc, name) for hc in group]) for group in groups])

    return ConnectionStack(
        iters,
        tau,
        **{name: gather(name) for name in ("phi_pre", "phi_post", "phi_res", "alpha", "b_pre", "b_post", "b_res")},
    )


# -- the family: blocks with two connections, wide blocks that mix streams, the model -------------
class MHCBlock(Block):
    """A nanochat block plus one connection per sub-layer (H_pre starts on streams 2l, 2l + 1 mod n)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        n = cfg.mhc_num_streams
        streams = ((2 * layer) % n, (2 * layer + 1) % n)
        if cfg.mhc_variant == "static":
            self.hc_attn = StaticHyperConnection(n, streams[0])
            self.hc_mlp = StaticHyperConnection(n, streams[1])
        else:
            self.hc_attn = DynamicHyperConnection(n, cfg.n_embd, streams[0])
            self.hc_mlp = DynamicHyperConnection(n, cfg.n_embd, streams[1])

    @torch.no_grad()
    def init_weights(self, bound: float) -> None:
        super().init_weights(bound)
        self.hc_attn.reset_parameters()
        self.hc_mlp.reset_parameters()

    @staticmethod
    def stack_type() -> type["MHCWideBlocks"]:
        return MHCWideBlocks


@dataclass
class MHCWideBlocks(WideBlocks):
    """nanochat's wide blocks plus the stacked connections of their two sub-layers."""

    hc_attn: ConnectionStack | None = None
    hc_mlp: ConnectionStack | None = None

    @classmethod
    def build(cls, blocks, cfg: ModelConfig, lambdas, average_branches: bool = False, **extra):
        iters, tau = cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau
        return super().build(
            blocks, cfg, lambdas, average_branches,
            hc_attn=stack_connections([[b.hc_attn for b in g] for g in blocks], iters, tau),
            hc_mlp=stack_connections([[b.hc_mlp for b in g] for g in blocks], iters, tau),
            **extra,
        )

    def __call__(self, x: Tensor, inputs: BlockInputs, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """x: (G, B, T, n, D) -> (F(x), A = H_res_mlp @ H_res_attn of shape (G, b, t, n, n)), b = t = 1 when static."""
        x = self.blend(x, inputs)
        x, res_attn = self.sublayer(x, self.hc_attn, lambda xn: self.attention(xn, inputs, cache))
        x, res_mlp = self.sublayer(x, self.hc_mlp, self.mlp)
        return x, torch.matmul(res_mlp, res_attn)

    def sublayer(self, x: Tensor, hc: ConnectionStack, branch: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """H_res @ x + H_post * branch(norm(H_pre . x)) on x (G, B, T, n, D); returns (x', H_res)."""
        pre, post, res = hc.coefficients(x)
        out = self.scaled(branch(rms_norm((pre.unsqueeze(-1) * x).sum(-2))))
        return torch.matmul(res, x) + post.unsqueeze(-1) * out.unsqueeze(-2), res

    def attention_input(self, x: Tensor) -> Tensor:
        pre, _, _ = self.hc_attn.coefficients(x)
        return rms_norm((pre.unsqueeze(-1) * x).sum(-2))


class MHCGPT(GPT):
    """An mHC Transformer: nanochat's model with n-stream hidden states (summed before the head)."""

    family = "mhc"
    block_type = MHCBlock

    def __init__(self, config: ModelConfig):
        if not config.use_mhc:
            raise ConfigError("MHCGPT needs an mHC config (use_mhc=True); build_model(config) picks the family")
        super().__init__(config)
