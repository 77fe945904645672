"""Every private torch / Lightning / litdata API this project calls, in one place, checked.

A private API may change in any release. Each one is looked up here, at first use, and the call
this project makes is checked against its signature (``inspect.signature(...).bind``); a mismatch
is one line naming the API and the installed version (``CompatError``, a ``Fault``: exit code 1)
instead of a TypeError deep inside a training step. Overridden private hooks are checked too: a
renamed hook would otherwise silently stop being called.

    torch        torch.optim._muon.muon + DEFAULT_A/B/C  nanochat's Muon update (optim.MuonAdamW)
                 torch._dynamo.config.*recompile_limit   raised by the compiling commands (raise_dynamo_limits)
                 torch._dynamo.exc.BackendCompilerFailed  a failed --compile (snlp generate)
                 aten._scaled_dot_product_attention_math  the default CPU attention kernel (models/attention.py)
    litdata      litdata.streaming.fs_provider._get_fs_provider  remote prepared folders (prepared.py)
    Lightning    lightning.pytorch.strategies.fsdp._move_torchmetrics_to_device,
                 _setup_activation_checkpointing          FSDP on CPU processes (strategy.py)
                 LightningCLI._instantiate_trainer, _parse_ckpt_path,
                 FSDPStrategy._setup_model                overridden hooks (cli.py, strategy.py)

Not here: ``export/standalone.py`` loads packages with ``torch._inductor.package.load_package``
without importing this package (an exported package runs without the training code).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from .errors import Fault


class CompatError(Fault):
    """An installed library no longer has a private API in the form this project calls (exit code 1)."""


def installed_version(package: str) -> str:
    """'torch 2.13.0' (or 'torch (version unknown)')."""
    from importlib import metadata

    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        module = importlib.import_module(package)
        return f"{package} {getattr(module, '__version__', '(version unknown)')}"


def _fail(api: str, package: str, problem: str) -> CompatError:
    return CompatError(
        f"{api} of {installed_version(package)} {problem}; install a {package} version that snlp-lightning "
        "supports (pyproject.toml, install.sh) or report this"
    )


def lookup(api: str, package: str) -> Any:
    """The object at dotted path ``api`` (module path, then attributes), or a CompatError."""
    parts = api.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise _fail(api, package, "does not exist")


def check_call(fn: Callable, api: str, package: str, positional: int = 0, keywords: Sequence[str] = ()) -> Callable:
    """``fn`` must accept a call with ``positional`` positional arguments and ``keywords`` by name
    (the call this project makes); returns ``fn``, else raises a CompatError naming ``api``."""
    if not callable(fn):
        raise _fail(api, package, f"is a {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return fn
    try:
        signature.bind(*([None] * positional), **dict.fromkeys(keywords))
    except TypeError as err:
        shown = str(signature)
        shown = shown if len(shown) <= 300 else shown[:297] + "..."
        raise _fail(api, package, f"does not take the call this project makes ({err}): its signature is {shown}") from None
    return fn


def check_hook(cls: type, name: str, package: str, positional: int = 0) -> None:
    """A private method that a subclass here overrides must still exist (and take ``positional``
    arguments after self): otherwise the override would silently never run."""
    api = f"{cls.__module__}.{cls.__qualname__}.{name}"
    hook = getattr(cls, name, None)
    if hook is None:
        raise _fail(api, package, "does not exist (this project overrides it)")
    check_call(hook, api, package, positional=1 + positional)


# -- torch ----------------------------------------------------------------------------------------------
MUON_KEYWORDS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn", "has_complex")


@functools.cache
def torch_muon() -> tuple[Callable, tuple[float, float, float]]:
    """torch's functional Muon update (what ``torch.optim.Muon.step`` calls) and its Newton-Schulz
    coefficients: ``update(params, grads, momentum_bufs, lr=..., ...)``, ``(a, b, c)``."""
    fn = check_call(lookup("torch.optim._muon.muon", "torch"), "torch.optim._muon.muon", "torch", 3, MUON_KEYWORDS)
    coefficients = tuple(lookup(f"torch.optim._muon.DEFAULT_{c}", "torch") for c in "ABC")
    if not all(isinstance(c, float) for c in coefficients):
        raise _fail("torch.optim._muon.DEFAULT_A/B/C", "torch", f"are {coefficients!r}, not three floats")
    return fn, coefficients


def sdpa_math() -> Callable:
    """SDPA's math kernel as an op, ``(query, key, value, attn_mask=, is_causal=, enable_gqa=) ->
    (out, weights)``: the CPU attention whose float32 rounding every recorded CPU number has."""
    api = "torch.ops.aten._scaled_dot_product_attention_math"
    op = lookup(api, "torch")
    names = {a.name for a in op.default._schema.arguments}
    missing = sorted({"query", "key", "value", "attn_mask", "is_causal", "enable_gqa"} - names)
    if missing:
        raise _fail(api, "torch", f"has no argument(s) {', '.join(missing)}")
    return op


def raise_dynamo_limits(recompile: int = 256, accumulated: int = 4096) -> None:
    """Let dynamo recompile one frame many times (global; the compiling commands call it at entry).

    Every decoder (one per plan) compiles the same Python code with a different ``self``; dynamo
    counts those as recompiles of one frame, so a sweep of plans needs more than the default 8.
    """
    config = lookup("torch._dynamo.config", "torch")
    for name, value in (("recompile_limit", recompile), ("accumulated_recompile_limit", accumulated)):
        current = getattr(config, name, None)
        if not isinstance(current, int):
            raise _fail(f"torch._dynamo.config.{name}", "torch", "does not exist")
        setattr(config, name, max(current, value))


@functools.cache
def backend_compiler_failed() -> type[BaseException]:
    """torch._dynamo.exc.BackendCompilerFailed: what torch.compile raises when the backend's
    compiler fails (no C++ compiler, or one that fails)."""
    api = "torch._dynamo.exc.BackendCompilerFailed"
    cls = lookup(api, "torch")
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        raise _fail(api, "torch", "is not an exception class")
    return cls


# -- litdata --------------------------------------------------------------------------------------------
@functools.cache
def litdata_fs_provider() -> Callable:
    """litdata's ``_get_fs_provider(uri)``: the file-system provider (s3, gs, ...) for a remote URI."""
    api = "litdata.streaming.fs_provider._get_fs_provider"
    return check_call(lookup(api, "litdata"), api, "litdata", positional=1)


# -- Lightning -------------------------------------------------------------------------------------------
@functools.cache
def lightning_fsdp_helpers() -> tuple[Callable, Callable]:
    """Lightning's FSDPStrategy helpers ``_move_torchmetrics_to_device(module, device)`` and
    ``_setup_activation_checkpointing(module, kwargs)``."""
    helpers = []
    for name in ("_move_torchmetrics_to_device", "_setup_activation_checkpointing"):
        api = f"lightning.pytorch.strategies.fsdp.{name}"
        helpers.append(check_call(lookup(api, "lightning"), api, "lightning", positional=2))
    return helpers[0], helpers[1]


@functools.cache
def check_lightning_cli_hooks() -> None:
    """SNLPCLI overrides LightningCLI's ``_instantiate_trainer(config, callbacks)`` and ``_parse_ckpt_path()``."""
    from lightning.pytorch.cli import LightningCLI

    check_hook(LightningCLI, "_instantiate_trainer", "lightning", positional=2)
    check_hook(LightningCLI, "_parse_ckpt_path", "lightning")


@functools.cache
def check_fsdp_strategy_hooks() -> None:
    """BlockFSDPStrategy overrides FSDPStrategy's ``_setup_model(model)``."""
    from lightning.pytorch.strategies import FSDPStrategy

    check_hook(FSDPStrategy, "_setup_model", "lightning", positional=1)
