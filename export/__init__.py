"""Export: the compiled, fused, layer-parallel decoder, generation, packaging and the benchmark."""

from .decoder import DECODER_METHODS, DecoderError, LayerParallelDecoder
from .generate import generate_tokens, speculative_tokens
from .runtime import GenerationError
from .speculative import SpeculativeStats

__all__ = [
    "DECODER_METHODS",
    "DecoderError",
    "GenerationError",
    "LayerParallelDecoder",
    "SpeculativeStats",
    "generate_tokens",
    "speculative_tokens",
]
