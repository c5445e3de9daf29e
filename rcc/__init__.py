"""rcc-llm: Recurrent Context Compression (Huang et al. 2024, arXiv 2406.06110)
on any Hugging Face causal LM.

The public names are imported on first use (PEP 562), so ``import rcc`` and the
``rcc`` console entry start without torch/transformers; the CLI can then answer
Ctrl-C during those imports with one line.
"""

from importlib import import_module

from rcc._version import __version__

_WHERE = {
    "DEFAULT_MODEL": ".bundled",
    "RCCConfig": ".config",
    "RCCError": ".errors",
    "CompressedContext": ".memory",
    "RCCModel": ".model",
    "RCCOutput": ".model",
}
__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
