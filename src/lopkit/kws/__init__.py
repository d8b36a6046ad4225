"""HEiMDaL (arXiv 2210.15425): streaming wake-word detection and localization with a low-footprint causal CNN.

Modules, in the order data flows:

- :mod:`lopkit.kws.synth`, :mod:`lopkit.kws.augment`, :mod:`lopkit.kws.corpus`: an offline wake-word corpus
  synthesised with espeak-ng (exact word/phone times), flite and festival (cross-engine test voices), noise and
  reverb; cached, sharded and resumable;
- :mod:`lopkit.kws.features`: log-mel with ``torch.stft`` (offline and streaming give the same frames);
- :mod:`lopkit.kws.model`: causal BC-ResNet with detection and start-offset heads, and the equal-footprint frame
  phone classifier of the DNN-HMM baseline; :mod:`lopkit.kws.hmm`: the baseline's keyword Viterbi decoder;
- :mod:`lopkit.kws.losses`: alignment-based detection loss, offset loss, utterance-level and phone losses;
- :mod:`lopkit.kws.train`, :mod:`lopkit.kws.continual`: the ``kws_train`` and ``kws_continual`` benchmarks;
- :mod:`lopkit.kws.stream`, :mod:`lopkit.kws.metrics`: streaming detection (``lopkit kws listen``), DET curves,
  FRR at fixed FA/h, start-time errors;
- :mod:`lopkit.kws.pipeline`, :mod:`lopkit.kws.report`, :mod:`lopkit.kws.cli`: ``lopkit kws run|build|train|
  evaluate|listen|continual|report``.

See docs/kws.md.
"""

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing the package stays free of torch

from lopkit._lazy import lazy_attributes

#: Public name -> the module defining it (imported on first access, PEP 562).
_EXPORTS: dict[str, str] = {
    "BCResNetKWS": "lopkit.kws.model",
    "Detection": "lopkit.kws.stream",
    "FeatureStats": "lopkit.kws.features",
    "FramePhoneClassifier": "lopkit.kws.model",
    "StreamingDetector": "lopkit.kws.stream",
    "StreamingLogMel": "lopkit.kws.features",
    "count_parameters": "lopkit.kws.model",
    "det_curve": "lopkit.kws.metrics",
    "frr_at_fa": "lopkit.kws.metrics",
    "listen": "lopkit.kws.stream",
    "log_mel": "lopkit.kws.features",
    "relative_reduction": "lopkit.kws.metrics",
    "start_error_summary": "lopkit.kws.metrics",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time the names come from __getattr__
    from lopkit.kws.features import FeatureStats, StreamingLogMel, log_mel
    from lopkit.kws.metrics import det_curve, frr_at_fa, relative_reduction, start_error_summary
    from lopkit.kws.model import BCResNetKWS, FramePhoneClassifier, count_parameters
    from lopkit.kws.stream import Detection, StreamingDetector, listen


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
