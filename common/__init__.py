"""The library behind the rollback scripts: settings, CLI contract, backup store, files, processes."""

__version__ = "0.1.0"
