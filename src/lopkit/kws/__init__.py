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

from lopkit.kws.features import FeatureStats, StreamingLogMel, log_mel
from lopkit.kws.metrics import det_curve, frr_at_fa, relative_reduction, start_error_summary
from lopkit.kws.model import BCResNetKWS, FramePhoneClassifier, count_parameters
from lopkit.kws.stream import Detection, StreamingDetector, listen

__all__ = [
    "BCResNetKWS",
    "Detection",
    "FeatureStats",
    "FramePhoneClassifier",
    "StreamingDetector",
    "StreamingLogMel",
    "count_parameters",
    "det_curve",
    "frr_at_fa",
    "listen",
    "log_mel",
    "relative_reduction",
    "start_error_summary",
]
