"""A deliberately naive re-statement of spec sections 5 and 9, one block and one head at a time.

Written from the formulas, not from the library's batched code: explicit per-head softmax
attention with an explicit mask, rotary tables built here, Sinkhorn without log space. The tests
compare the library's batched / fused paths against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from snlp_lightning import GPT


def rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def plain_sinkhorn(logits, iters, tau):
    """Sinkhorn-Knopp on exp(logits / tau): normalise rows, then columns, ``iters`` times."""
    p = torch.exp(logits / tau)
    for _ in range(iters):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    return p


def rotate(x, pos0=0):
    """Half-split rotary embedding, base from nothing but the spec. x: (B, T, H, hd)."""
    t, hd = x.size(1), x.size(-1)
    inv = torch.tensor([100000.0 ** (-2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    ang = torch.arange(pos0, pos0 + t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float().to(x.dtype)[None, :, None], ang.sin().float().to(x.dtype)[None, :, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)


def attention(model: GPT, layer: int, xn, idx):
    """Attn_l(xn) for xn (B, T, D), written head by head."""
    cfg, blk = model.config, model.transformer.h[layer]
    b, t, _ = xn.shape
    hd, hq, hkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    q = (xn @ blk.attn.c_q.weight.T).view(b, t, hq, hd)
    k = (xn @ blk.attn.c_k.weight.T).view(b, t, hkv, hd)
    v = (xn @ blk.attn.c_v.weight.T).view(b, t, hkv, hd)
    if cfg.has_value_embedding(layer):
        gate = 3 * torch.sigmoid(xn[..., :12] @ blk.attn.ve_gate.weight.T)  # (B, T, Hkv)
        v = v + gate[..., None] * model.value_embeds[str(layer)](idx).view(b, t, hkv, hd)
    q, k = rms(rotate(q)) * 1.2, rms(rotate(k)) * 1.2
    w = cfg.window_sizes()[layer]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = (j <= i) & (i - j <= w)
    heads = []
    for h in range(hq):
        kv = h // (hq // hkv)
        s = q[:, :, h] @ k[:, :, kv].transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(~allowed, float("-inf"))
        heads.append(torch.softmax(s, -1) @ v[:, :, kv])
    return torch.cat(heads, -1) @ blk.attn.c_proj.weight.T


def mlp(model: GPT, layer: int, xn):
    blk = model.transformer.h[layer]
    return F.relu(xn @ blk.mlp.c_fc.weight.T).square() @ blk.mlp.c_proj.weight.T


def connection(model: GPT, hc, x):
    """(H_pre, H_post, H_res) of one sub-layer for state x (B, T, n, D); per token when dynamic."""
    cfg = model.config
    if cfg.mhc_variant == "static":
        return (
            torch.softmax(hc.H_pre_logits, -1),
            torch.softmax(hc.H_post_logits, -1),
            plain_sinkhorn(hc.H_res_logits, cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau),
        )
    n = cfg.mhc_num_streams
    flat = rms(x.flatten(-2))
    pre = torch.sigmoid(hc.alpha[0] * flat @ hc.phi_pre.T + hc.b_pre)
    post = 2 * torch.sigmoid(hc.alpha[1] * flat @ hc.phi_post.T + hc.b_post)
    res_logits = hc.alpha[2] * (flat @ hc.phi_res.T).unflatten(-1, (n, n)) + hc.b_res
    return pre, post, plain_sinkhorn(res_logits, cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau)


def sublayer(model, hc, branch, x):
    if hc is None:
        return x + branch(rms(x[..., 0, :])).unsqueeze(-2)
    pre, post, res = connection(model, hc, x)
    pooled = torch.einsum("...n,...nd->...d", pre, x)
    return res @ x + post[..., None] * branch(rms(pooled)).unsqueeze(-2)


def block(model: GPT, layer: int, h, x0, idx):
    """F_l(h) for h (B, T, n, D), including the resid / x0 blend."""
    cfg, blk = model.config, model.transformer.h[layer]
    if cfg.uses_lambdas:
        h = model.resid_lambdas[layer] * h + model.x0_lambdas[layer] * x0
    hc_attn = blk.hc_attn if cfg.use_mhc else None
    hc_mlp = blk.hc_mlp if cfg.use_mhc else None
    h = sublayer(model, hc_attn, lambda xn: attention(model, layer, xn, idx), h)
    return sublayer(model, hc_mlp, lambda xn: mlp(model, layer, xn), h)


def embed(model: GPT, idx):
    cfg = model.config
    e = rms(model.transformer.wte(idx))
    x = e.clone()
    if cfg.smear:
        for t in range(1, idx.size(1)):
            gate = model.smear_lambda * torch.sigmoid(e[:, t, :24] @ model.smear_gate.weight.T)
            x[:, t] = e[:, t] + gate * e[:, t - 1]
    return x.unsqueeze(-2).expand(*x.shape[:2], cfg.n_streams, cfg.n_embd)


def forward(model: GPT, idx):
    """Sequential logits, everything above in one readable loop."""
    cfg = model.config
    x0 = embed(model, idx)
    h, mid = x0, None
    for layer in range(cfg.n_layer):
        h = block(model, layer, h, x0, idx)
        if layer == cfg.n_layer // 2:
            mid = h
    x = h.sum(-2)
    if cfg.backout:
        x = x - model.backout_lambda * mid.sum(-2)
    logits = (rms(x) @ model.lm_head.weight.T)[..., : cfg.vocab_size]
    return 15 * torch.tanh(logits / 15)


def fused_block(model: GPT, layers: list[int], h, x0, idx, average: bool = False):
    """Spec section 3: M blocks fused into one, on h (B, T, n, D). Returns (F(h), A or None).

    The blend uses the M blocks' mean lambdas; each sub-layer sums the M branches on one normed
    input (value embeddings only when M = 1), divided by M when ``average``; mHC uses the mean of
    the M connections' matrices, and A = H_res_mlp @ H_res_attn.
    """
    cfg, m = model.config, len(layers)
    if cfg.uses_lambdas:
        h = model.resid_lambdas[layers].mean() * h + model.x0_lambdas[layers].mean() * x0
    scale = 1.0 / m if average else 1.0

    def attn(xn):
        if m == 1:
            return attention(model, layers[0], xn, idx)
        plain = model.config.replace(no_ve=True)  # fused chunks drop value embeddings
        saved, model.config = model.config, plain
        try:
            return sum(attention(model, l, xn, idx) for l in layers)
        finally:
            model.config = saved

    def mlps(xn):
        return sum(mlp(model, l, xn) for l in layers)

    mixing = []
    for name, branch in (("hc_attn", attn), ("hc_mlp", mlps)):
        if not cfg.use_mhc:
            h = h + scale * branch(rms(h[..., 0, :])).unsqueeze(-2)
            continue
        mats = [connection(model, getattr(model.transformer.h[l], name), h) for l in layers]
        pre, post, res = (sum(c[i] for c in mats) / m for i in range(3))
        pooled = torch.einsum("...n,...nd->...d", pre, h)
        h = res @ h + post[..., None] * (scale * branch(rms(pooled))).unsqueeze(-2)
        mixing.append(res)
    return h, (mixing[1] @ mixing[0] if mixing else None)


def head(model: GPT, h, mid):
    """Logits from the last state h and the backout state mid, both (B, T, n, D)."""
    cfg = model.config
    x = h.sum(-2)
    if cfg.backout:
        x = x - model.backout_lambda * mid.sum(-2)
    logits = (rms(x) @ model.lm_head.weight.T)[..., : cfg.vocab_size]
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
