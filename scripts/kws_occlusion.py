"""Occlusion test of every trained spotter in kws pipeline folders (issue 19: which part of the keyword it uses).

Usage: PYTHONPATH=src python scripts/kws_occlusion.py RUN_DIR [RUN_DIR ...] [--split test_seen] [--threads 1]

For each folder and model (``models/<kind>.pt``), scores the split's positive clips intact and with the keyword's
first word, its first phone, its last phone, or a control span before it occluded (:func:`lopkit.kws.analysis.occlusion_test`), at
the model's stored operating threshold (1 FA/h on the folder's negative stream) and at the intact clips' median
window peak. Writes ``eval/occlusion.json`` in each folder (reused while the model file is unchanged) and prints a
table; ``scripts/kws_results_md.py`` puts the table into docs/kws.md.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def occlusion_of_folder(folder: Path, split: str) -> dict:
    """``{kind: result}`` of every exported model in ``folder`` (cached in eval/occlusion.json)."""
    from lopkit.kws.analysis import PARTS, occlusion_test
    from lopkit.kws.continual import load_exported_model
    from lopkit.kws.pipeline import exported_hmm_settings
    from lopkit.kws.train import load_split_features

    cache_path = folder / "eval" / "occlusion.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    state = json.loads((folder / "pipeline.json").read_text())
    accept_frames = int(round(100 * float(state["config"]["accept_after_s"])))
    data = None
    out = {}
    for path in sorted((folder / "models").glob("*.pt")):
        kind, digest = path.stem, _digest(path)
        key = f"{kind}:{split}"
        if cache.get(key, {}).get("model_sha") == digest and all(part in cache[key] for part in PARTS):
            out[kind] = cache[key]
            continue
        model, export = load_exported_model(path)
        if data is None:
            data = load_split_features(str(folder / "corpus"), split)
        positive = (data.label == 1).nonzero().flatten().tolist()
        result = occlusion_test(model, export["config"]["model_kind"], data.feats[positive], data.start_s[positive],
                                data.end_s[positive], [data.phones[i] for i in positive], exported_hmm_settings(export),
                                float(export["threshold"]), int(export["smooth_frames"]), accept_frames)
        result.update(model_sha=digest, split=split)
        out[kind] = cache[key] = result
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return out


def main(argv: list[str]) -> int:
    """Run (or reuse) the occlusion test of every folder and print one table."""
    import argparse

    import torch

    from lopkit.kws.analysis import PARTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="kws pipeline folders (lopkit kws run --out)")
    parser.add_argument("--split", default="test_seen", help="clip split whose positives are scored")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for folder in args.folders:
        if not (folder / "models").is_dir() or not (folder / "pipeline.json").exists():
            print(f"error: {folder} is not a kws pipeline folder with trained models (models/*.pt); run "
                  "'lopkit kws run' first", file=sys.stderr)
            return 2
        for kind, result in occlusion_of_folder(folder, args.split).items():
            rates = " ".join(f"{c} {result[c]['rate']:.2f}/{result[c]['rate_at_median']:.2f}"
                             for c in ("intact", *PARTS))
            print(f"{folder} {kind} n={result['n']}: detected at threshold / at median peak: {rates}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
