"""The bundled default corpus: English text that ships with every CPython install, no download.

Documents, in this order, exact duplicates dropped (first one kept):

1. every help topic of ``pydoc_data.topics.topics`` (what ``help("if")`` prints), by sorted key;
2. docstrings (``inspect.getdoc``) of standard-library modules and of the classes, functions and
   methods they define, walking ``sys.stdlib_module_names`` and their submodules in sorted order.

Modules with side effects on import (``antigravity`` opens a browser, ``this`` prints, GUI and test
packages, ``__main__`` submodules) are never imported. The walk runs in a separate, isolated
interpreter (``python -I -S``: no site-packages, no environment variables), because third-party
packages patch the standard library (typing_extensions replaces ``typing._collect_parameters``,
for one) and would make the corpus depend on what happens to be imported; it also keeps whatever
the stdlib imports do away from the caller. Modules that fail to import on this platform are
skipped. The result depends only on the Python build (the version is in the manifest): 2.04 MB /
6,463 documents on CPython 3.11.7.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Top-level names never imported: side effects, GUI, tests, the help topics (taken directly), and
# distutils / lib2to3 (setuptools may swap distutils in; lib2to3 may write grammar caches).
SKIP_TOP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "ensurepip",
    "readline", "pydoc_data", "lib2to3", "distutils", "msilib", "encodings",
})
SKIP_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
MIN_DOC_CHARS = 40  # drops one-liners like "Return self==value." that carry almost no language


def _wanted(name: str) -> bool:
    parts = name.split(".")
    if parts[0] in SKIP_TOP or parts[0].startswith(("_test", "_xx", "xx")):
        return False
    return not any(p.startswith("__") or p in SKIP_PARTS for p in parts)


def _import_all() -> dict[str, object]:
    import contextlib
    import importlib
    import io
    import pkgutil
    import sys
    import warnings

    modules: dict[str, object] = {}
    queue = sorted(n for n in sys.stdlib_module_names if _wanted(n))
    sink = io.StringIO()
    while queue:
        name = queue.pop(0)
        if name in modules:
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except BaseException:  # ImportError on other platforms, SystemExit from odd modules, ...
            continue
        modules[name] = module
        if hasattr(module, "__path__"):
            subs = sorted(f"{name}.{info.name}" for info in pkgutil.iter_modules(module.__path__))
            queue.extend(s for s in subs if _wanted(s))
    return modules


def collect_documents() -> list[str]:
    """The corpus, computed in this process (imports ~470 stdlib modules; prefer bundled_documents)."""
    import inspect

    import pydoc_data.topics

    docs: list[str] = []
    seen_text: set[str] = set()
    seen_obj: set[int] = set()

    def add(text: str | None) -> None:
        if text and len(text) >= MIN_DOC_CHARS and text not in seen_text:
            seen_text.add(text)
            docs.append(text)

    def doc_of(obj: object) -> str | None:
        try:
            return inspect.getdoc(obj)
        except Exception:
            return None

    def walk(obj: object, depth: int) -> None:
        if id(obj) in seen_obj:
            return
        seen_obj.add(id(obj))
        add(doc_of(obj))
        if inspect.isclass(obj) and depth == 0:
            for attr in sorted(vars(obj)):
                if attr.startswith("__") and attr not in ("__init__", "__call__"):
                    continue
                member = vars(obj)[attr]
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or inspect.isdatadescriptor(member) or inspect.isclass(member):
                    walk(member, depth + 1)

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        add(topics[key].strip())
    modules = _import_all()
    for name in sorted(modules):
        module = modules[name]
        add(doc_of(module))
        namespace = vars(module)
        for attr in sorted(namespace):
            obj = namespace[attr]
            if attr.startswith("__") or inspect.ismodule(obj):
                continue
            if inspect.isclass(obj) or inspect.isroutine(obj):
                walk(obj, 0)
    return docs


def bundled_documents() -> list[str]:
    """The corpus, computed by running this file in an isolated interpreter (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "docs.json"
        proc = subprocess.run(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve()), str(out)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=tmp,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"collecting the bundled corpus failed (exit {proc.returncode}): {tail[0]}")
        return json.loads(out.read_text(encoding="utf-8"))


if __name__ == "__main__":  # python -I -S bundled.py OUT.json  (what bundled_documents runs)
    Path(sys.argv[1]).write_text(json.dumps(collect_documents(), ensure_ascii=False), encoding="utf-8")
