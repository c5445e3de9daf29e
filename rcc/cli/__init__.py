"""The ``rcc`` command line (:func:`main`): every parser and every command function."""

from rcc.cli.commands import main

__all__ = ["main"]
