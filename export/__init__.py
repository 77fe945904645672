"""Export: the compiled, fused, layer-parallel decoder, generation, packaging and the benchmark."""

from .decoder import DECODER_METHODS, DecoderError, LayerParallelDecoder

__all__ = ["DECODER_METHODS", "DecoderError", "LayerParallelDecoder"]
