"""rcc-llm: Recurrent Context Compression (Huang et al. 2024, arXiv 2406.06110)
on any Hugging Face causal LM."""

from .bundled import DEFAULT_MODEL
from .config import RCCConfig
from .errors import RCCError
from .memory import CompressedContext
from .model import RCCModel, RCCOutput

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "RCCConfig", "RCCError", "CompressedContext", "RCCModel", "RCCOutput", "__version__"]
