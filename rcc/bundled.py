"""Models shipped inside the package: ``rcc/models/<name>/`` in the
:func:`~rcc.checkpoint.save_pretrained` format, selected by their bare name."""

from __future__ import annotations

from pathlib import Path

from rcc.config import CONFIG_FILE
from rcc.errors import RCCError

DEFAULT_MODEL = "rcc-smollm2-135m"
BUNDLED_MODELS = (DEFAULT_MODEL,)
MODELS_DIR = Path(__file__).resolve().parent / "models"


def resolve_bundled(spec: str, models_dir: str | Path | None = None) -> str:
    """The folder of a bundled model for its bare name; any other ``spec`` unchanged.

    A bare name always means the bundled model; a local folder of the same
    name is reached as ``./rcc-smollm2-135m``.

    Args:
        spec: a model name as given to ``--model`` / ``from_pretrained``.
        models_dir: where bundled models live (default: the package's ``models/``).
    Raises:
        RCCError: when ``spec`` names a bundled model whose weights this install lacks.
    """
    if str(spec) not in BUNDLED_MODELS:
        return spec
    folder = Path(models_dir or MODELS_DIR) / str(spec)
    if not (folder / CONFIG_FILE).is_file():
        raise RCCError(
            f"{spec}: the bundled model's weights are missing from this install (no {folder / CONFIG_FILE}); "
            "pass --model, e.g. --model embedded:smollm2 for an untrained model"
        )
    return str(folder)
