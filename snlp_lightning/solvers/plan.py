"""SolverPlan: the one place where the plan notation is parsed, validated and written back.

Notation (spec section 2; options after K may come in any order):

    seq                                 the sequential model
    seq:nN:CxFM                         fused chunks run one after another (what a fused plan converges to)
    METHOD:nN[:CxFM]:KK[:INIT][:OPTION...]

    METHOD  fixed | idn | hcn | diagn | damped | newton
    nN      N parallel blocks (the last N; S = L - N run sequentially first)
    CxFM    C chunks of M fused blocks, C * M = N (or FM alone: C = N / M); omitted = NxF1
    KK      1 <= K <= C parallel iterations (K = C is already exact)
    INIT    h0 (default: every iterate starts at h_init) | batch_fwd (one extra batched call)
    OPTION  kappa=0.5 (damped) | probes=2, eps=0.01, est=fd|vjp (diagn) | avg (fused branches / M)
            | aw (authors' windows, below)

Examples: ``idn:n24:4xF6:K2:h0``, ``hcn:n16:K1``, ``diagn:n8:K2:batch_fwd``, ``damped:n8:K3:kappa=0.3``,
``idn:n8:K2:aw``.

``aw`` (``authors_windows``, off by default) reproduces the authors' batched solvers, which call
SDPA with ``is_causal=True`` in the parallel part and so ignore the sliding windows of the N
parallel layers (their prefix layers keep them; spec section 9). With it every wide-block call of
the parallel part (iterations, ``batch_fwd``, the chunks of a ``seq:nN:CxFM`` plan) attends with
a full causal window, so such a plan converges to "the sequential model whose last N layers see
the whole context", not to the model itself; without it (our default) K = C stays exact. It
changes nothing for models without short windows or for T <= the short window. It is an
evaluation switch of full forwards: the KV-cached decoder refuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import ModelConfig

METHODS = ("seq", "fixed", "idn", "hcn", "diagn", "damped", "newton")
INITS = ("h0", "batch_fwd")
ESTIMATORS = ("fd", "vjp")
NOTATION = "seq | seq:nN:CxFM | METHOD:nN[:CxFM]:KK[:h0|batch_fwd][:kappa=..|probes=..|eps=..|est=fd|vjp|avg|aw]"


class PlanError(UserError):
    """A plan that cannot be parsed or does not fit the model; the message says what is allowed."""


@dataclass(frozen=True)
class SolverPlan:
    method: str = "seq"
    n_par: int = 0
    chunks: int = 0
    fuse: int = 1
    iters: int = 0
    init: str = "h0"
    kappa: float = 0.5
    probes: int = 1
    eps: float = 1e-2
    estimator: str = "fd"
    average_branches: bool = False
    authors_windows: bool = False  # 'aw': full causal windows in the parallel part, as the authors' code

    # -- notation ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: "str | SolverPlan") -> "SolverPlan":
        if isinstance(text, SolverPlan):
            return text
        if not isinstance(text, str):
            raise PlanError(f"a plan must be a string such as 'idn:n4:K2', got {type(text).__name__} {text!r}")
        if not text.strip():
            raise PlanError(f"empty plan {text!r}; expected {NOTATION}")
        raw = text.strip()
        parts = raw.split(":")
        method = parts[0].lower()
        if method in ("jacobi", "picard", "fp"):
            method = "fixed"
        if method not in METHODS:
            raise PlanError(f"unknown method {parts[0]!r} in plan {raw!r}; allowed: {', '.join(METHODS)}")
        fields: dict = {"method": method}
        seen: set[str] = set()

        def once(key: str, token: str) -> None:
            if key in seen:
                raise PlanError(f"plan {raw!r} gives {key} twice ({token!r}); expected {NOTATION}")
            seen.add(key)

        for token in parts[1:]:
            if m := re.fullmatch(r"n(\d+)", token):
                once("n", token)
                fields["n_par"] = int(m[1])
            elif m := re.fullmatch(r"(\d+)xF(\d+)", token, flags=re.IGNORECASE):
                once("fusion", token)
                fields["chunks"], fields["fuse"] = int(m[1]), int(m[2])
            elif m := re.fullmatch(r"F(\d+)", token, flags=re.IGNORECASE):
                once("fusion", token)  # FM alone: C = N / M, checked below
                fields["fuse"] = int(m[1])
            elif m := re.fullmatch(r"K(-?\d+)", token, flags=re.IGNORECASE):
                once("K", token)
                fields["iters"] = int(m[1])
            elif token in INITS:
                once("init", token)
                fields["init"] = token
            elif token == "avg":
                once("avg", token)
                fields["average_branches"] = True
            elif token == "aw":
                once("aw", token)
                fields["authors_windows"] = True
            elif m := re.fullmatch(r"(kappa|probes|eps|est)=(.+)", token):
                once(m[1], token)
                key, value = m[1], m[2]
                try:
                    if key == "est":
                        fields["estimator"] = value
                    elif key == "probes":
                        fields["probes"] = int(value)
                    else:
                        fields[key] = float(value)
                except ValueError:
                    raise PlanError(f"option {token!r} in plan {raw!r} needs a number") from None
            else:
                raise PlanError(f"cannot read {token!r} in plan {raw!r}; expected {NOTATION}")

        if method == "seq":
            if "K" in seen or "init" in seen:
                raise PlanError(f"plan {raw!r}: 'seq' takes no K or init; expected seq or seq:nN:CxFM")
            if ("n" in seen) != ("fusion" in seen):
                raise PlanError(f"plan {raw!r}: a fused sequential plan needs both nN and CxFM, e.g. seq:n8:2xF4")
        else:
            for key, example in (("n", "n8"), ("K", "K2")):
                if key not in seen:
                    raise PlanError(f"plan {raw!r} lacks {key} (e.g. {example}); expected {NOTATION}")
        # Options of other methods would be ignored without a word: refuse them.
        for option, methods in (("kappa", ("damped",)), ("probes", ("diagn",)), ("eps", ("diagn",)), ("est", ("diagn",))):
            if option in seen and method not in methods:
                raise PlanError(f"plan {raw!r}: option {option} applies only to {' / '.join(methods)} plans, not {method}")
        if "avg" in seen and fields.get("fuse", 1) == 1:
            raise PlanError(f"plan {raw!r}: avg divides fused branch sums by M, so it needs fused chunks (CxFM with M > 1)")
        if "aw" in seen and "n" not in seen:
            raise PlanError(f"plan {raw!r}: aw (authors' windows) changes the parallel part, so it needs one (nN), e.g. idn:n8:K2:aw")
        if "n" in seen and "chunks" not in fields:
            fuse = fields.get("fuse", 1)
            if fuse < 1 or fields["n_par"] % fuse:
                raise PlanError(f"plan {raw!r}: N={fields['n_par']} is not a multiple of M={fuse}; N must be a multiple of M")
            fields["chunks"] = fields["n_par"] // fuse
        return cls(**fields).check()

    def __str__(self) -> str:
        if self.method == "seq":
            if self.n_par == 0:
                return "seq"
            return f"seq:n{self.n_par}:{self.chunks}xF{self.fuse}" + (":avg" if self.average_branches else "") + (
                ":aw" if self.authors_windows else ""
            )
        parts = [self.method, f"n{self.n_par}"]
        if self.fuse != 1:
            parts.append(f"{self.chunks}xF{self.fuse}")
        parts += [f"K{self.iters}", self.init]
        if self.method == "damped":
            parts.append(f"kappa={self.kappa:g}")
        if self.method == "diagn":
            parts += [f"probes={self.probes}", f"eps={self.eps:g}", f"est={self.estimator}"]
        if self.average_branches:
            parts.append("avg")
        if self.authors_windows:
            parts.append("aw")
        return ":".join(parts)

    # -- checks -----------------------------------------------------------------------------------
    def check(self) -> "SolverPlan":
        """Checks that need no model."""
        if self.method not in METHODS:
            raise PlanError(f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.method != "seq" and self.iters < 1:
            raise PlanError(f"plan '{self}' has K={self.iters}; K must be >= 1")
        if self.method != "seq" and self.iters > max(self.chunks, 1):
            # After k iterations the first k chunks are exact whatever the surrogate (spec section 2),
            # so K = C already gives the chunk-sequential forward; more iterations change nothing
            # but the run time (an unbounded K ran until killed).
            raise PlanError(
                f"plan '{self}' has K={self.iters} but only C={self.chunks} chunk(s); K must lie in 1..{self.chunks} "
                f"(K = C is already exact)"
            )
        if self.n_par < 0 or (self.method != "seq" and self.n_par < 1):
            raise PlanError(f"plan '{self}' has N={self.n_par}; N must be >= 1")
        if self.fuse < 1 or self.chunks * self.fuse != self.n_par:
            raise PlanError(
                f"plan '{self}': {self.chunks}xF{self.fuse} does not split N={self.n_par}; "
                f"N must be a multiple of M and C * M must equal N"
            )
        if self.init not in INITS:
            raise PlanError(f"init {self.init!r} is not allowed: one of {', '.join(INITS)}")
        if not 0.0 <= self.kappa <= 1.0:
            raise PlanError(f"kappa={self.kappa} is not allowed: damping must lie in [0, 1]")
        if self.probes < 1:
            raise PlanError(f"probes={self.probes} is not allowed: DiagN needs at least 1 probe")
        if not 0 < self.eps < float("inf"):
            raise PlanError(f"eps={self.eps} is not allowed: the finite-difference step must be a finite number > 0")
        if self.estimator not in ESTIMATORS:
            raise PlanError(f"est={self.estimator!r} is not allowed: one of {', '.join(ESTIMATORS)}")
        if self.authors_windows and self.n_par == 0:
            raise PlanError(f"plan '{self}': aw (authors' windows) changes the parallel part, so it needs N >= 1")
        return self

    def validate(self, cfg: "ModelConfig") -> "SolverPlan":
        """Checks against a model; returns self so calls chain."""
        self.check()
        if self.n_par > cfg.n_layer:
            raise PlanError(f"plan '{self}' has N={self.n_par} parallel blocks but the model has L={cfg.n_layer}; N must be <= L")
        if self.method == "hcn" and not cfg.use_mhc:
            raise PlanError(
                f"plan '{self}': method 'hcn' needs an mHC model (use_mhc=True); "
                f"for this model use one of: fixed, idn, diagn, damped, newton"
            )
        return self

    # -- derived numbers --------------------------------------------------------------------------
    def prefix_len(self, n_layer: int) -> int:
        """S, the number of blocks run sequentially before the parallel part."""
        return n_layer - self.n_par

    def chunk_layers(self, n_layer: int) -> list[list[int]]:
        """Layer indices of each chunk: C lists of M consecutive layers after the prefix."""
        start = self.prefix_len(n_layer)
        return [list(range(start + c * self.fuse, start + (c + 1) * self.fuse)) for c in range(self.chunks)]

    def dependent_calls(self, n_layer: int) -> int:
        """Block-sized calls in the critical path: S + K (+1 for batch_fwd); L for 'seq'."""
        if self.method == "seq":
            return self.prefix_len(n_layer) + self.chunks
        return self.prefix_len(n_layer) + self.iters + (1 if self.init == "batch_fwd" else 0)

    def describe(self, n_layer: int) -> str:
        """One line of plain words, e.g. for logs and benchmark tables."""
        if self.method == "seq" and self.n_par == 0:
            return f"sequential: all {n_layer} blocks one after another"
        head = f"{self.prefix_len(n_layer)} sequential blocks, then {self.chunks} chunk(s) of {self.fuse} fused block(s)"
        if self.authors_windows:
            head += " with full causal windows (aw)"
        if self.method == "seq":
            return head + " run one after another"
        init = "from h_init" if self.init == "h0" else "from one batched forward (batch_fwd)"
        return f"{head}, {self.iters} {self.method} iteration(s) {init}; ideal speedup {self.ideal_speedup(n_layer):.2f}x"

    def ideal_speedup(self, n_layer: int) -> float:
        """Spec section 2's latency model: L / (S + K), counting a batched call as one block."""
        return n_layer / self.dependent_calls(n_layer)
