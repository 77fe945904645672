"""Export: the compiled, fused, layer-parallel decoder, generation, packaging and the benchmark.

Names are imported lazily, so the torch-only modules (``export.runtime``, ``export.text``,
``export.standalone``) load without the training code.
"""

from importlib import import_module

_NAMES = {
    "DECODER_METHODS": "decoder",
    "DecoderError": "decoder",
    "LayerParallelDecoder": "decoder",
    "generate_tokens": "generate",
    "speculative_tokens": "generate",
    "GenerationError": "runtime",
    "SpeculativeStats": "speculative",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(import_module(f".{_NAMES[name]}", __name__), name)
