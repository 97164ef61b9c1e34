"""mtpspec: lossless speculative decoding with multi-token-prediction drafters.

    import mtpspec
    engine = mtpspec.load()                      # SmolLM2-135M-Instruct, the default model
    result = engine.generate("Write a haiku about CPUs.", max_new_tokens=64)
    print(result.text, result.stats)
"""

from .api import Engine, GenerationResult, TextStream, load
from .decoding.sampling import SamplingParams
from .errors import CheckpointError, InputError, MtpspecError

__all__ = [
    "load",
    "Engine",
    "GenerationResult",
    "TextStream",
    "SamplingParams",
    "MtpspecError",
    "CheckpointError",
    "InputError",
]
__version__ = "0.1.0"
