"""``lopkit diagnose``: name the plasticity trap of each layer of a stored run or a saved model, and try the cure.

Inputs: an experiment folder (or a folder of them) written by ``lopkit run``/``compare``, read through
:class:`~lopkit.runner.store.ResultStore` (read-only); or ``--model ckpt.pt --probe x.pt`` (a whole pickled
``nn.Module`` and a probe tensor). Output: text, or ``--json``. ``--fix`` applies the top-ranked cure that can join
a running training (architecture changes cannot) in a short continuation and prints a before/after table:

- stored run: the run is replayed from its config and seed into ``--out`` up to ``fix_steps`` before its end
  (stored runs keep no checkpoint once finished), checkpointed there, then continued to its end twice from the
  same state: as stored (the control) and with the cure added;
- model + probe: two short fits on the probe from copies of the model (targets given, or a seeded random target),
  without and with the cure.

The analysis itself is :mod:`lopkit.diagnostics.diagnose` (pure); this module only reads, runs and prints.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from lopkit.configs import ConfigError

__all__ = ["diagnose_store", "find_stores", "fix_model", "fix_stored", "load_model_and_probe", "register"]


# ------------------------------------------------------------------------------------------------ stored runs
def find_stores(path: str | Path) -> list[Path]:
    """The results files under ``path``: its own ``results.sqlite``, else every one below it (sorted)."""
    from lopkit.runner.store import STORE_FILENAME, resolve_store_file

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; pass a folder written by 'lopkit run ... --out DIR'")
    if path.is_file():
        return [path]
    own = resolve_store_file(path)
    if own.exists():
        return [own]
    found = sorted(path.rglob(STORE_FILENAME))
    if not found:
        raise ConfigError(f"{str(path)!r} holds no {STORE_FILENAME} (nor does any folder below it); run an experiment "
                          f"first, e.g. 'lopkit run random_labels --preset e1 --out {path}'")
    return found


def _store_frames(path: Path) -> tuple[Any, Any]:
    """(runs, metrics) of a store, read-only; ConfigError when it holds no run or no metric row."""
    from lopkit.runner.store import ResultStore

    store = ResultStore(path, read_only=True)
    try:
        runs, metrics = store.runs(), store.metrics()
    finally:
        store.close()
    if runs.empty:
        raise ConfigError(f"the store {path} holds no run; run an experiment into it first ('lopkit run ... --out DIR')")
    if metrics.empty:
        raise ConfigError(f"the store {path} holds {len(runs)} run(s) but no metric row; let a run measure before "
                          "diagnosing it")
    return runs, metrics


def diagnose_store(path: str | Path, config: Any = None) -> list[tuple[Any, list[str]]]:
    """One (Diagnosis, run ids) per configuration (seeds pooled) of the store at ``path``."""
    from lopkit.diagnostics.diagnose import DiagnoseConfig, judge, measure_rows
    from lopkit.report.aggregate import config_labels

    config = config or DiagnoseConfig()
    path = Path(path)
    runs, metrics = _store_frames(path)
    runs = runs.set_index("run_id", drop=False)
    labels = config_labels(runs)
    results = []
    for label in dict.fromkeys(labels.tolist()):
        ids = labels.index[labels == label].tolist()
        rows = metrics[metrics["run_id"].isin(ids)]
        if rows.empty:
            continue
        first = runs.loc[ids[0]]
        steps = rows["step"]
        source = (f"{path.parent.name}: {first['benchmark']}/{first['preset']} {label} ({len(ids)} seed(s), measured "
                  f"steps {int(steps.min())}-{int(steps.max())})")
        notes = [f"Reference: each run's first measurement; value: its mean over the final {config.final_fraction:.0%} "
                 "of the measured steps; both averaged over seeds."]
        if not rows["metric"].isin(["probe_gain", "plasticity_probe_gain"]).any():
            notes.append("No plasticity-probe rows in this store: the low-plasticity trap is not judged.")
        results.append((judge(measure_rows(rows, config), config, source=source, reference_label="first measurement",
                              notes=notes), ids))
    return results


# ------------------------------------------------------------------------------------------------ model + probe
def _torch_load(path: str | Path, what: str) -> Any:
    """``torch.load(weights_only=False)`` with one-line errors for a missing or unreadable file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (any unpickling failure is a bad file for the user)
        raise ConfigError(f"cannot read {what} file {str(path)!r} with torch.load ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'})") from None


def load_model_and_probe(model_path: str | Path, probe_path: str | Path, targets_path: str | Path | None = None,
                         ) -> tuple[Any, Any, Any]:
    """(model, probe inputs, probe targets or None) from files; ConfigError (one line) for anything unusable."""
    import torch
    from torch import nn

    model = _torch_load(model_path, "model")
    if not isinstance(model, nn.Module):
        hint = (" (it looks like a state_dict: save the whole module with torch.save(model, path))"
                if isinstance(model, dict) else "")
        raise ConfigError(f"{str(model_path)!r} holds a {type(model).__name__}, not a pickled torch.nn.Module{hint}")
    probe = _torch_load(probe_path, "probe")
    targets = None
    if isinstance(probe, dict) and "x" in probe:
        probe, targets = probe["x"], probe.get("y")
    elif isinstance(probe, (tuple, list)) and len(probe) == 2:
        probe, targets = probe
    if targets_path is not None:
        targets = _torch_load(targets_path, "targets")
    if not isinstance(probe, torch.Tensor):
        raise ConfigError(f"{str(probe_path)!r} holds a {type(probe).__name__}; save a tensor of probe inputs (N, ...), "
                          "a tuple (x, y) or a dict {'x': ..., 'y': ...}")
    return model, probe, targets


# ------------------------------------------------------------------------------------------------ cures that can join
def continuable(spec: str) -> bool:
    """Whether a method can join a model mid-training (it does not rebuild the architecture in ``prepare_model``)."""
    from lopkit.mitigations.base import Mitigation
    from lopkit.mitigations.registry import build_methods

    method = build_methods(spec)
    parts = method.methods if hasattr(method, "methods") else [method]
    return all(type(m).prepare_model is Mitigation.prepare_model for m in parts)


def cure_applies(spec: str, model: Any) -> bool:
    """Whether the cure's method attaches to (a copy of) ``model``; unit resets, e.g., refuse CReLU layers."""
    import torch

    from lopkit.mitigations.registry import build_methods

    twin = copy.deepcopy(model)
    try:
        build_methods(spec).attach(twin, torch.optim.SGD(twin.parameters(), lr=0.0))
    except (ValueError, ConfigError):
        return False
    return True


def adapted_spec(name: str, steps: int) -> str:
    """The method spec for a continuation of ``steps`` steps: periodic methods check 4 times within it."""
    from lopkit.mitigations.registry import get_method

    method = get_method(name)
    config = getattr(method, "config", None)
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if "every" in fields and getattr(config, "every") > max(1, steps // 4):
        every = max(1, steps // 4)
        window = min(int(getattr(config, "window_steps", every)), every)
        return f"{name}:every={every}" + (f":window_steps={window}" if "window_steps" in fields else "")
    return name


# direction in which a finding's metric moves when the trap is escaped
_BETTER_LOWER = {"dead_fraction", "saturated_not_dead_fraction", "frozen_not_dead_fraction", "live_clone_fraction",
                 "duplicate_fraction", "weight_norm", "hessian_top_eigenvalue", "cloning_r2_forward",
                 "cloning_r2_variance_ratio_forward"}


def _recovered(metric: str, before: float, control: float, cured: float) -> str:
    """'yes' when the cure moved the metric the right way past the control, else 'no' (n/a without numbers)."""
    if not all(isinstance(v, float) and math.isfinite(v) for v in (before, control, cured)):
        return "n/a"
    lower = metric in _BETTER_LOWER
    better = cured < control if lower else cured > control
    return "yes" if better else "no"


def _fix_table(rows: list[tuple[str, float, float, float]]) -> str:
    """Markdown before/after table."""
    from lopkit.diagnostics.diagnose import format_number

    lines = ["| quantity | before | after, control | after, with the cure | recovered |", "|---|---:|---:|---:|---|"]
    for name, before, control, cured in rows:
        metric = name.split(" @ ")[0]
        lines.append(f"| {name} | {format_number(before)} | {format_number(control)} | {format_number(cured)} | "
                     f"{_recovered(metric, before, control, cured)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ --fix: model
def _fit(model: Any, probe_x: Any, target: Any, loss_fn: Callable, steps: int, lr: float, method: Any, seed: int) -> Any:
    """Train a copy of ``model`` on the probe for ``steps`` Adam steps with the method's hooks; returns the copy."""
    import torch

    twin = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=lr)
    method.seed_from_run(seed)
    method.attach(twin, optimizer)
    method.on_task_start(twin, optimizer, 0)
    for step in range(steps):
        loss = loss_fn(twin(probe_x), target)
        extra = method.loss_term(twin)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_step(twin, optimizer, step)
        optimizer.step()
        method.after_step(twin, optimizer, step)
    return twin.eval()


def fix_model(model: Any, probe_x: Any, probe_y: Any, diagnosis: Any, config: Any, steps: int, lr: float,
              ) -> tuple[str, str, list]:
    """Fit copies of the model on the probe without and with the top cure; returns (cure spec, header, table rows)."""
    import torch

    from lopkit.diagnostics.diagnose import default_loss, random_target, measure_model
    from lopkit.mitigations.registry import build_methods

    top = diagnosis.top_cure(lambda spec: continuable(spec) and cure_applies(spec, model))
    if top is None:
        raise ConfigError("no trap with a cure that can join a running training (and attach to this model) was "
                          "found; nothing to fix")
    finding, cure = top
    spec = adapted_spec(cure.method, steps)
    if probe_y is None:
        with torch.no_grad():
            target, loss_fn = random_target(copy.deepcopy(model).eval()(probe_x), config.seed), torch.nn.functional.mse_loss
    else:
        target, loss_fn = probe_y, default_loss
    control = _fit(model, probe_x, target, loss_fn, steps, lr, build_methods("sgd"), config.seed)
    cured = _fit(model, probe_x, target, loss_fn, steps, lr, build_methods(spec), config.seed)
    measured = [diagnosis.measures]
    for twin in (control, cured):
        measured.append(measure_model(twin, probe_x, probe_y, None, config))
    metrics = [e.metric for e in finding.evidence]
    rows = []
    for metric in metrics:
        rows.append((f"{metric} @ {finding.layer}", *[m.get(finding.layer, _empty()).values.get(metric, float("nan"))
                                                       for m in measured]))
    rows.append(("probe_gain @ model", *[m.get("model", _empty()).values.get("probe_gain", float("nan")) for m in measured]))
    header = (f"--fix: top finding {finding.label} in layer {finding.layer}; cure --method {spec}; {steps} Adam steps "
              f"(lr {lr:g}) on the probe ({'its targets' if probe_y is not None else 'a seeded random target'}), from "
              "copies of the model: control without a method, then with the cure")
    return spec, header, rows


def _empty() -> Any:
    from lopkit.diagnostics.diagnose import LayerMeasure

    return LayerMeasure()


# ------------------------------------------------------------------------------------------------ --fix: stored run
def _benchmark_probe(benchmark: Any) -> Any:
    """The probe inputs a benchmark measures on, where it exposes them (continual: ``_probe``), else None."""
    import torch

    probe = getattr(benchmark, "_probe", None)
    tasks = getattr(benchmark, "tasks", None)
    if probe is None and callable(getattr(benchmark, "_make_probe", None)) and tasks:  # between two tasks (continual)
        probe = benchmark._make_probe(tasks[min(int(getattr(benchmark, "task", 0)), len(tasks) - 1)])
    if isinstance(probe, (tuple, list)) and probe:
        probe = probe[0]
    if probe is None:
        probe = getattr(benchmark, "run_probe_inputs", None)
    return probe if isinstance(probe, torch.Tensor) else None


def _finish(benchmark: Any, until: int) -> list[dict]:
    """Advance a benchmark to step ``until`` (or its end); returns its rows."""
    rows: list[dict] = []
    while not benchmark.done and benchmark.step < until:
        rows += benchmark.run(max(1, min(1000, until - benchmark.step)))
    return rows


def _last(rows: list[dict], layer: str, metric: str) -> float:
    """The value of ``metric`` on ``layer`` at the latest step in ``rows`` (NaN if absent)."""
    found = [r for r in rows if r["layer"] == layer and r["metric"] == metric and r["value"] is not None]
    return float(max(found, key=lambda r: r["step"])["value"]) if found else float("nan")


def fix_stored(store_file: Path, run_id: str, diagnosis: Any, config: Any, fix_steps: int, out_dir: Path,
               progress: Any = "never") -> tuple[str, str, list]:
    """Continue a stored run for ``fix_steps`` steps twice from one state: as stored (control) and with the top cure.

    The state is the run's checkpoint in the store when it has one (an unfinished run) and it is more than 0 steps
    from the end; otherwise (finished runs keep none) the run is replayed from its config and seed to ``fix_steps``
    before its end. Everything is written under ``out_dir`` (its own results.sqlite): the replay (paused at the branch
    step, checkpoint kept) and the cured continuation. Returns (cure spec, header, table rows).
    """
    from lopkit.benchmarks.base import get_benchmark
    from lopkit.configs import build_config, config_to_dict
    from lopkit.diagnostics.diagnose import probe_gain
    from lopkit.runner.execute import execute_run, resolve_methods
    from lopkit.runner.store import ResultStore, code_version, make_run_id, serialize_state

    source = ResultStore(store_file, read_only=True)
    try:
        run = source.get_run(run_id)
        stored_rows = source.metrics(run_id=run_id).to_dict("records") if run is not None else []
        checkpoint = source.load_checkpoint(run_id) if run is not None else None
    finally:
        source.close()
    if run is None:
        raise ConfigError(f"run {run_id!r} is not in {store_file}")
    cls = get_benchmark(run["benchmark"])
    config_dict = json.loads(run["config_json"])
    bench_config = build_config(cls.Config, config_dict)
    seed, method = int(run["seed"]), str(run["method"])
    stored_bench = cls(bench_config, seed, resolve_methods(method))
    total = int(stored_bench.total_steps)
    top = diagnosis.top_cure(lambda spec: continuable(spec) and cure_applies(spec, stored_bench.model))
    if top is None:
        raise ConfigError("no trap with a cure that can join a running training (and attach to this model) was "
                          "found; nothing to fix")
    finding, cure = top
    if not 0 < fix_steps < total:
        raise ConfigError(f"--fix-steps must be between 1 and the run's {total} steps, got {fix_steps}")
    from_checkpoint = checkpoint is not None and int(checkpoint[0]) < total
    branch = int(checkpoint[0]) if from_checkpoint else total - fix_steps
    until = min(total, branch + fix_steps)
    spec = adapted_spec(cure.method, until - branch)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out_dir / "results.sqlite")
    try:
        if from_checkpoint:
            state = checkpoint[1]
            replay_rows = [r for r in stored_rows if r["step"] <= branch]
        else:
            replay = execute_run(store, cls, bench_config, seed, [method], stop_after_steps=branch, progress=progress,
                                 preset=run["preset"], handle_sigint=False)
            saved = store.load_checkpoint(replay.run_id)
            if saved is None:
                raise ConfigError(f"the replay of run {run_id} kept no checkpoint at step {branch}")
            state = saved[1]
            replay_rows = store.metrics(run_id=replay.run_id).to_dict("records")
        control = cls(bench_config, seed, resolve_methods(method))
        control.load_state_dict(copy.deepcopy(state))
        probe = _benchmark_probe(control)
        gain_before = probe_gain(control.model, probe, config.probe_steps, config.probe_lr, config.seed) if probe is not None else float("nan")
        control_rows = _finish(control, until)
        gain_control = probe_gain(control.model, probe, config.probe_steps, config.probe_lr, config.seed) if probe is not None else float("nan")
        cured = cls(bench_config, seed, resolve_methods([method, spec]))
        cured_state = copy.deepcopy(state)
        if "method" in cured_state:
            cured_state["method"] = cured.method.state_dict()  # the cure starts fresh; the stored method had its state
        cured.load_state_dict(cured_state)
        cured_rows = _finish(cured, until)
        gain_cured = probe_gain(cured.model, probe, config.probe_steps, config.probe_lr, config.seed) if probe is not None else float("nan")
        label = f"{method}+{spec}" if method not in ("sgd", "none", "baseline") else spec
        cured_id = make_run_id(cls.name, f"diagnose-fix {label}", bench_config, seed)
        store.start_run(cls.name, f"diagnose-fix {label}", config_to_dict(bench_config), seed, preset=run["preset"],
                        run_id=cured_id)
        store.set_total_steps(cured_id, until)
        store.commit_chunk(cured_id, cured_rows, serialize_state(cured.state_dict()), cured.step)
        store.finish_run(cured_id)
    finally:
        store.close()
    rows = []
    for evidence in finding.evidence:
        metric = evidence.metric
        stored_name = {"saturated_not_dead_fraction": "saturated_fraction",
                       "frozen_not_dead_fraction": "frozen_fraction"}.get(metric, metric)
        before = _last(replay_rows, finding.layer, stored_name)  # the replay's last measurement before the branch
        rows.append((f"{stored_name} @ {finding.layer}", before, _last(control_rows, finding.layer, stored_name),
                     _last(cured_rows, finding.layer, stored_name)))
    rows.append(("probe_gain @ model", gain_before, gain_control, gain_cured))
    first_metric = rows[0][0].split(" @ ")[0]
    stored_last = _last([r for r in stored_rows if r["step"] <= until], finding.layer, first_metric)
    same = (math.isclose(stored_last, rows[0][2], rel_tol=1e-6, abs_tol=1e-9)
            if math.isfinite(stored_last) and not from_checkpoint else None)
    check = ("" if same is None else f"; the control {'reproduces' if same else 'does NOT reproduce'} the stored run's "
             f"final {first_metric} ({stored_last:.4g})")
    if same is False:  # say why when the code that wrote the run is not the code replaying it
        now, then = code_version(), str(run.get("code_version") or "unknown")
        if now != then:
            check += (f" (stored by lopkit {then}, replayed by {now}: a change in the order of float operations, "
                      "e.g. single runs moving to PyTorch's fused Adam, alters the last bits, and a long run "
                      "amplifies them; the control and the cure still share one state, so their comparison holds)")
    how = (f"continued from its checkpoint at step {branch}" if from_checkpoint else
           f"replayed into {out_dir} up to step {branch}")
    header = (f"--fix: top finding {finding.label} in layer {finding.layer} (run {run_id}, seed {seed}); the run was "
              f"{how} and run to step {until} twice: as stored (control) and with --method {spec} added{check}; "
              f"runs in {out_dir}")
    return spec, header, rows


# ------------------------------------------------------------------------------------------------ command
def _diagnose(args: argparse.Namespace) -> int:
    from lopkit.runner.cli_common import apply_threads, error_exit
    from lopkit.runner.store import StoreError

    try:
        return _diagnose_checked(args, apply_threads)
    except (ConfigError, StoreError, FileNotFoundError) as err:
        return error_exit(str(err))
    except ValueError as err:  # the analysis' bad-input errors (probe shape, targets)
        return error_exit(str(err))


def _diagnose_checked(args: argparse.Namespace, apply_threads: Callable) -> int:
    from lopkit.configs import build_config, parse_overrides
    from lopkit.diagnostics.diagnose import DiagnoseConfig, diagnose

    apply_threads(args)
    config = build_config(DiagnoseConfig, parse_overrides(args.set or []))
    if (args.model is None) != (args.probe is None):
        raise ConfigError("--model and --probe go together: pass a pickled model file and a probe tensor file")
    if args.model is not None and args.path is not None:
        raise ConfigError("pass either an experiment folder or --model/--probe, not both")
    if args.model is None and args.path is None:
        raise ConfigError("nothing to diagnose: pass an experiment folder (lopkit diagnose runs/e1) or "
                          "--model ckpt.pt --probe x.pt")
    if args.fix_steps < 1:
        raise ConfigError(f"--fix-steps must be >= 1, got {args.fix_steps}")
    if args.fix and args.path is not None and args.out is None:
        raise ConfigError("--fix on a stored run needs --out DIR for the continuation runs (the stored folder is "
                          "never written)")
    if args.model is not None:
        model, probe_x, probe_y = load_model_and_probe(args.model, args.probe, args.targets)
        result = diagnose(model, probe_x, probe_y, None, config)
        fixed = fix_model(model, probe_x, probe_y, result, config, args.fix_steps, args.fix_lr) if args.fix else None
        _emit([result], args, fixed)
        return 0
    stores = find_stores(args.path)
    results: list[tuple[Any, list[str], Path]] = []
    for store_file in stores:
        results += [(d, ids, store_file) for d, ids in diagnose_store(store_file, config)]
    diagnoses = [d for d, _, _ in results]
    if not args.fix:
        _emit(diagnoses, args)
        return 0
    if any((Path(args.out) / "results.sqlite").resolve() == f.resolve() for f in stores):
        raise ConfigError(f"--out {args.out} is the diagnosed experiment's own folder; pass a new folder (the stored "
                          "runs are never written)")
    chosen = [(d, ids, f) for d, ids, f in results if d.top_cure(continuable) is not None]
    if args.run is not None:
        chosen = [(d, ids, f) for d, ids, f in results if args.run in ids]
        if not chosen:
            raise ConfigError(f"run {args.run!r} is not in {args.path}")
    if not chosen:
        raise ConfigError("no configuration has a trap with a cure that can join a running training; nothing to fix")
    diagnosis, ids, store_file = chosen[0]
    run_id = args.run or ids[0]
    fixed = fix_stored(store_file, run_id, diagnosis, config, args.fix_steps, Path(args.out))
    _emit(diagnoses, args, fixed)
    return 0


def _emit(diagnoses: list[Any], args: argparse.Namespace, fixed: tuple[str, str, list] | None = None) -> None:
    """Print text or JSON (a list of diagnoses; with --fix an object {"diagnoses": [...], "fix": {...}})."""
    from lopkit.diagnostics.diagnose import json_float, format_diagnosis

    if args.json:
        listed = [d.to_dict() for d in diagnoses]
        if fixed is None:
            print(json.dumps(listed, indent=1))
            return
        spec, header, rows = fixed
        fix = {"cure": spec, "description": header,
               "rows": [{"quantity": name, "before": json_float(b), "after_control": json_float(c),
                         "after_cure": json_float(k), "recovered": _recovered(name.split(" @ ")[0], b, c, k)}
                        for name, b, c, k in rows]}
        print(json.dumps({"diagnoses": listed, "fix": fix}, indent=1))
        return
    print("\n\n".join(format_diagnosis(d) for d in diagnoses))
    if fixed is not None:
        print("\n" + fixed[1] + "\n\n" + _fix_table(fixed[2]))


def register(subparsers: Any) -> None:
    """Add the ``diagnose`` sub-command."""
    from lopkit.runner.cli_common import add_threads_flag

    parser = subparsers.add_parser(
        "diagnose", help="name the plasticity trap of each layer (stored run or saved model) and the cures to try",
        description="Per layer: which trap (frozen/dead units, saturated units, live cloned units, rank collapse, "
                    "weight growth, sharp curvature, low plasticity-probe fit), the evidence with its threshold and "
                    "the paper's reason, and the cures ranked as --method specs. Thresholds: --set key=value "
                    "(docs/diagnose.md).")
    parser.add_argument("path", nargs="?", default=None,
                        help="experiment folder written by 'lopkit run' (or a folder of them); read-only")
    parser.add_argument("--model", default=None, metavar="CKPT", help="a whole pickled nn.Module (torch.save(model, CKPT))")
    parser.add_argument("--probe", default=None, metavar="FILE",
                        help="probe inputs saved with torch.save: a tensor (N, ...), a tuple (x, y) or {'x':..., 'y':...}")
    parser.add_argument("--targets", default=None, metavar="FILE", help="probe targets (enables the gradient metrics)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="DiagnoseConfig thresholds")
    parser.add_argument("--fix", action="store_true", help="apply the top-ranked cure in a short continuation and "
                                                           "print a before/after table")
    parser.add_argument("--fix-steps", type=int, default=900, metavar="N",
                        help="steps of the continuation (stored run: the last N steps of the run; default 900)")
    parser.add_argument("--fix-lr", type=float, default=1e-3, help="Adam learning rate of the model+probe fit")
    parser.add_argument("--out", default=None, metavar="DIR", help="where --fix writes its runs (stored-run input)")
    parser.add_argument("--run", default=None, metavar="RUN_ID", help="the stored run --fix continues (default: the "
                                                                      "first run of the first configuration with a trap)")
    add_threads_flag(parser)
    parser.set_defaults(func=_diagnose)
