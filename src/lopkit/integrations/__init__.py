"""Callbacks that run the lopkit :class:`~lopkit.diagnostics.monitor.Monitor` inside other training frameworks.

- :mod:`lopkit.integrations.lightning`: :class:`~lopkit.integrations.lightning.LopkitCallback` for a Lightning
  ``Trainer`` (``pip install 'lopkit[lightning]'``);
- :mod:`lopkit.integrations.huggingface`: :class:`~lopkit.integrations.huggingface.LopkitTrainerCallback` for a
  Hugging Face ``transformers.Trainer`` (``pip install 'lopkit[hf]'``).

Importing this package imports neither framework; each sub-module imports only its own.
"""
