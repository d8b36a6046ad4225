"""lopkit: find, explain and fix loss of plasticity (LoP) in PyTorch models.

Sub-packages, in the order data flows through them:
``data`` -> ``benchmarks`` -> ``runner`` (+ ``mitigations``, + ``diagnostics.Monitor``) -> store -> ``report``.
``diagnostics`` and ``theory`` are standalone and never import the runner.
"""

__version__ = "0.1.0"
