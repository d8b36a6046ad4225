"""The MoE-PHDS experiment as resumable stages: pretrain -> fine-tune variants -> evaluate -> report.

Every stage is a run in ONE results store (``OUT/results.sqlite``) executed with
:func:`lopkit.runner.execute.execute_run`; a finished run is skipped and an interrupted one resumes from its last
checkpoint, so killing :func:`run_pipeline` at any moment and calling it again continues where it stopped and
ends with the same rows. Trained weights stay in the store (``keep_checkpoint=True``); each later stage loads them
by run id.

Fine-tune variants (labels; ``k_low = max(1, k_pre // 2)``, ``K_train = {k_low..k_pre}``, ``k_anchor = k_pre - 1``;
with the spec's k_pre = 4 that is K_train = {2, 3, 4}, anchor 3, naive at k = 2):

- ``oracle1`` .. ``oracle{k_pre}``: SFT at one fixed k with the PHDS soft mask (the well-specified baselines);
- ``naive``: SFT at fixed k_low with plain hard top-k routing (what simply setting the router's top_k does) **[R]**;
- ``phds``: multi-k SFT, k ~ Uniform(K_train), per-k norms, no curriculum;
- ``phds_anchor``: as ``phds`` plus the anchor curriculum (the spec's "PHDS [2,3,4]->3");
- ablations (``ablations=True``, on by default only for the ``default``/``paper`` presets): ``phds_anchor_eps0``
  (eps = 0) and ``phds_anchor_shared_norms`` (one set of norms).

Overrides: ``pretrain.KEY=V``, ``finetune.KEY=V`` and ``eval.KEY=V`` go to one stage; a bare ``KEY=V`` goes to
every stage whose config has that field (ConfigError if none has it). The wall time of each stage (summed over
resumes; a process killed mid-stage adds nothing, since the time is added when the run returns) is kept in
``OUT/moe_timings.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lopkit.configs import ConfigError
from lopkit.moe.common import TIMINGS_FILE, k_low

__all__ = [
    "PIPELINE_PRESETS",
    "STAGES",
    "PipelineResult",
    "finetune_variants",
    "run_pipeline",
    "split_overrides",
    "variant_labels",
]

STAGES = ("pretrain", "finetune", "evaluate", "report")
PIPELINE_PRESETS = ("smoke", "mini", "default", "paper")
_STAGE_PREFIXES = ("pretrain", "finetune", "eval")
PRETRAIN_LABEL = "pretrain"
PRETRAINED_MODEL = "pretrained"


@dataclasses.dataclass
class PipelineResult:
    """What :func:`run_pipeline` did: the store, the run ids by (label, seed), the report and the stage statuses."""

    out_dir: Path
    run_ids: dict[tuple[str, int], str]
    eval_run_ids: dict[tuple[str, int], str]
    statuses: dict[tuple[str, int], str]
    report_path: Path | None
    interrupted: bool = False


def finetune_variants(k_pre: int, ablations: bool = False) -> dict[str, dict[str, Any]]:
    """Config overrides of every fine-tune variant, by label (see the module docstring)."""
    low = k_low(k_pre)
    k_train = tuple(range(low, k_pre + 1))
    anchor = max(1, k_pre - 1)
    variants: dict[str, dict[str, Any]] = {}
    for k in range(1, k_pre + 1):
        variants[f"oracle{k}"] = {"k_schedule": "fixed", "k_fixed": k, "anchor_k": None, "per_k_norms": False}
    variants["naive"] = {"k_schedule": "fixed", "k_fixed": low, "routing": "hard", "anchor_k": None,
                         "per_k_norms": False}
    multi = {"k_schedule": "multi", "k_train": k_train, "per_k_norms": True}
    variants["phds"] = {**multi, "anchor_k": None}
    variants["phds_anchor"] = {**multi, "anchor_k": anchor}
    if ablations:
        variants["phds_anchor_eps0"] = {**multi, "anchor_k": anchor, "eps": 0.0}
        variants["phds_anchor_shared_norms"] = {**multi, "anchor_k": anchor, "per_k_norms": False}
    return variants


def variant_labels(k_pre: int, ablations: bool = False) -> list[str]:
    """Labels of the fine-tune variants in run order."""
    return list(finetune_variants(k_pre, ablations))


def _fields(cls: type) -> set[str]:
    """Init field names of a dataclass config."""
    return {f.name for f in dataclasses.fields(cls) if f.init}


def split_overrides(overrides: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Route ``{"pretrain.steps": 10, "lr": 1e-3}`` to ``{"pretrain": {...}, "finetune": {...}, "eval": {...}}``."""
    from lopkit.moe.evaluate import MoEEvalConfig
    from lopkit.moe.train import MoEFinetuneConfig, MoEPretrainConfig

    fields = {"pretrain": _fields(MoEPretrainConfig), "finetune": _fields(MoEFinetuneConfig),
              "eval": _fields(MoEEvalConfig)}
    routed: dict[str, dict[str, Any]] = {stage: {} for stage in _STAGE_PREFIXES}
    for key, value in (overrides or {}).items():
        stage, dot, name = str(key).partition(".")
        if dot:
            if stage not in routed:
                raise ConfigError(f"override {key!r}: the prefix must be one of {', '.join(_STAGE_PREFIXES)} "
                                  f"(e.g. finetune.lr=1e-3)")
            routed[stage][name] = value
            continue
        targets = [s for s in _STAGE_PREFIXES if key in fields[s]]
        if not targets:
            known = sorted(set().union(*fields.values()))
            raise ConfigError(f"override {key!r} is no field of any moe stage; known fields: {', '.join(known)} "
                              f"(prefix with pretrain./finetune./eval. to target one stage)")
        for stage in targets:
            routed[stage][key] = value
    return routed


class _Timings:
    """Seconds per stage run, summed over resumes, kept in ``OUT/moe_timings.json`` (shared by parallel processes)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / TIMINGS_FILE

    def _read(self) -> dict[str, float]:
        """The file's entries ({} when it is missing or unreadable)."""
        if not self.path.exists():
            return {}
        try:
            return {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (ValueError, OSError, AttributeError):
            return {}

    def add(self, key: str, seconds: float) -> None:
        """Add ``seconds`` to ``key`` and save: re-read and replaced under an exclusive lock, so that processes
        running stages of one experiment in parallel keep each other's entries."""
        with open(self.path.with_suffix(".lock"), "a") as lock:
            _lock_exclusive(lock)
            values = self._read()
            values[key] = values.get(key, 0.0) + float(seconds)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(values, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def _lock_exclusive(handle: Any) -> None:
    """Block until this process holds an exclusive lock on the open file (released when it is closed); POSIX
    ``flock``, Windows ``msvcrt.locking``."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def _require_finished(store: Any, run_id: str, what: str, command: str) -> None:
    """ConfigError unless ``run_id`` is a finished run of ``store``."""
    run = store.get_run(run_id)
    if run is None or run["status"] != "finished":
        status = "missing" if run is None else f"{run['status']} at step {run['step']}/{run['total_steps']}"
        raise ConfigError(f"{what} is not finished in {store.path} ({status}); run '{command}' first")


def run_pipeline(
    out_dir: str | Path,
    preset: str = "smoke",
    seeds: Sequence[int] = (0,),
    overrides: Mapping[str, Any] | None = None,
    progress: bool | str = False,
    *,
    stages: Sequence[str] = STAGES,
    variants: Sequence[str] | None = None,
    ablations: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> PipelineResult:
    """Run (or resume, skipping finished runs) the MoE-PHDS stages into ``OUT/results.sqlite``.

    ``stages``: a subset of ``pretrain, finetune, evaluate, report`` (a stage whose input is missing raises
    ConfigError naming the command to run first). ``variants``: fine-tune labels to run/evaluate (default all,
    see :func:`finetune_variants`). ``ablations``: add the eps=0 and shared-norm ablations (default: only for the
    ``default`` and ``paper`` presets). ``progress`` is passed to ``execute_run`` (True: bars on a terminal).
    """
    from lopkit.moe.evaluate import MoEEval
    from lopkit.moe.train import MoEFinetune, MoEPretrain
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore

    say = log or (lambda _text: None)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if preset not in PIPELINE_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PIPELINE_PRESETS)}")
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    routed = split_overrides(overrides)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store_dir = str(out)
    pre_config = MoEPretrain.make_config(preset, routed["pretrain"])
    include_ablations = preset in ("default", "paper") if ablations is None else bool(ablations)
    all_variants = finetune_variants(pre_config.k_pre, include_ablations)
    chosen = list(variants) if variants is not None else list(all_variants)
    bad = [v for v in chosen if v not in finetune_variants(pre_config.k_pre, True)]
    if bad:
        raise ConfigError(f"unknown fine-tune variant(s) {bad}; choose from "
                          f"{', '.join(finetune_variants(pre_config.k_pre, True))}")
    every_variant = finetune_variants(pre_config.k_pre, True)
    command = f"lopkit moe run --preset {preset} --out {out}"

    timings = _Timings(out)
    run_ids: dict[tuple[str, int], str] = {}
    eval_ids: dict[tuple[str, int], str] = {}
    statuses: dict[tuple[str, int], str] = {}
    store = ResultStore(out)
    started = time.monotonic()

    def execute(cls: Any, config: Any, seed: int, label: str, keep: bool, key: str, run_id: str,
                source: str | None = None) -> str:
        # fine-tune states hold two copies of the weights plus AdamW moments: checkpoint 5 times per run
        # (and at least every 30 s), not 20
        every = max(1, config.steps // 5) if cls is MoEFinetune else None
        # a stage that continues the run ``source`` gets its kept state from the pipeline's store (read here, not
        # by the benchmark); a finished run is skipped without reading it. ``run_id``: resolved once by the caller
        done = (store.get_run(run_id) or {}).get("status") == "finished"
        initial = store.kept_state(source) if source is not None and not done else None
        result = execute_run(store, cls, config, seed, checkpoint_every=every, progress=progress, preset=preset,
                             label=label, keep_checkpoint=keep, initial_state=initial, run_id=run_id)
        statuses[(key, seed)] = result.status
        if result.status != "skipped":
            timings.add(f"{key}/seed{seed}", result.seconds)
        say(f"[moe {preset}] {key} seed={seed}: {result.status} at step {result.step}/{result.total_steps}"
            f" in {result.seconds:.1f}s (run {result.run_id})")
        return result.status

    try:
        for seed in seeds:
            pre_id = store.resolve_run_id(MoEPretrain.name, PRETRAIN_LABEL, pre_config, seed)
            run_ids[(PRETRAIN_LABEL, seed)] = pre_id
            if "pretrain" in stages:
                if execute(MoEPretrain, pre_config, seed, PRETRAIN_LABEL, True, "pretrain", pre_id) == "interrupted":
                    return PipelineResult(out, run_ids, eval_ids, statuses, None, True)
            elif "finetune" in stages:
                _require_finished(store, pre_id, f"the pretrain run of seed {seed} (preset {preset})",
                                  f"lopkit moe pretrain --preset {preset} --out {out}")
            for label in chosen:
                values = {**routed["finetune"], **every_variant[label], "variant": label, "init_store": store_dir,
                          "init_run_id": pre_id}
                ft_config = MoEFinetune.make_config(preset, values)
                ft_id = run_ids[(label, seed)] = store.resolve_run_id(MoEFinetune.name, label, ft_config, seed)
                if "finetune" in stages:
                    if execute(MoEFinetune, ft_config, seed, label, True, label, ft_id, pre_id) == "interrupted":
                        return PipelineResult(out, run_ids, eval_ids, statuses, None, True)
        if "evaluate" in stages:
            for seed in seeds:
                for label in [PRETRAINED_MODEL, *chosen]:
                    source = run_ids[(PRETRAIN_LABEL if label == PRETRAINED_MODEL else label, seed)]
                    _require_finished(store, source, f"the {label} run of seed {seed}",
                                      command if label == PRETRAINED_MODEL else
                                      f"lopkit moe finetune --preset {preset} --out {out}")
                    eval_config = MoEEval.make_config(preset, {**routed["eval"], "source_store": store_dir,
                                                               "source_run_id": source})
                    eval_id = eval_ids[(label, seed)] = store.resolve_run_id(MoEEval.name, label, eval_config, seed)
                    if execute(MoEEval, eval_config, seed, label, False, f"eval_{label}", eval_id,
                               source) == "interrupted":
                        return PipelineResult(out, run_ids, eval_ids, statuses, None, True)
    finally:
        store.close()
    report_path = None
    if "report" in stages:
        from lopkit.moe.report import build_moe_report

        tick = time.monotonic()
        report_path = build_moe_report(out).html_path
        timings.add("report", time.monotonic() - tick)
        say(f"[moe {preset}] report: {report_path}")
    say(f"[moe {preset}] done in {time.monotonic() - started:.1f}s")
    return PipelineResult(out, run_ids, eval_ids, statuses, report_path)
