"""``lopkit moe pretrain|finetune|evaluate|run|report|dial|finetune-hf``: the MoE-PHDS stages from the command line."""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from lopkit.configs import ConfigError

from lopkit.runner.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_progress_flags,
    add_threads_flag,
    apply_threads,
    error_exit,
    parse_seeds,
    progress_mode,
)

DEFAULT_OUT = Path("runs") / "moe"
_STAGES_OF = {
    "pretrain": ("pretrain",),
    "finetune": ("finetune",),
    "evaluate": ("evaluate", "report"),
    "run": ("pretrain", "finetune", "evaluate", "report"),
}


_error = error_exit


def _seeds(args: argparse.Namespace) -> list[int]:
    """Seeds from ``--seeds`` (count, list or range, as everywhere) or ``--seed-list a,b``."""
    if args.seed_list is not None:
        return parse_seeds(args.seed_list, "--seed-list", single_is_count=False)
    return parse_seeds(args.seeds)


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes the same stage(s)."""
    parts = ["lopkit", "moe", args.moe_command, "--preset", args.preset, "--out", str(args.out)]
    if args.seed_list is not None:
        parts += ["--seed-list", args.seed_list]
    else:
        parts += ["--seeds", str(args.seeds)]
    if args.overrides:
        parts += ["--set", *args.overrides]
    for variant in args.variants or []:
        parts += ["--variant", variant]
    if args.ablations is not None:
        parts.append("--ablations" if args.ablations else "--no-ablations")
    return " ".join(shlex.quote(p) for p in parts)


def _run_stages(args: argparse.Namespace) -> int:
    """Run the stages of ``args.moe_command``; exit 0, 1 (a run failed), 2 (bad input) or 130 (interrupted)."""
    from lopkit.configs import parse_overrides
    from lopkit.moe.pipeline import run_pipeline
    from lopkit.runner.execute import SETUP_ERRORS
    from lopkit.runner.store import StoreError

    try:
        overrides = parse_overrides(args.overrides)
        seeds = _seeds(args)
        apply_threads(args)
    except ConfigError as err:
        return _error(str(err))
    progress = progress_mode(args)
    try:
        result = run_pipeline(args.out, args.preset, seeds, overrides, progress, stages=_STAGES_OF[args.moe_command],
                              variants=args.variants or None, ablations=args.ablations)
    except (*SETUP_ERRORS, StoreError) as err:  # a bad config or a missing dataset (dict-gcide, fortunes): nothing
        # was run; or a store that cannot be used
        return _error(str(err))
    except KeyboardInterrupt:
        print(f"interrupted; completed chunks are saved. To resume: {_resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FloatingPointError as err:
        print(f"error: {err} (the failed run and its traceback are kept in the store)", file=sys.stderr)
        return EXIT_FAILED
    if result.interrupted:
        print(f"interrupted; completed chunks are saved. To resume: {_resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"results: {result.out_dir / 'results.sqlite'}")
    if result.report_path is not None:
        print(f"report: {result.report_path}")
        _print_targets(result.out_dir)
    elif args.moe_command != "run":
        follow = {"pretrain": "finetune", "finetune": "evaluate"}.get(args.moe_command)
        if follow:
            print(f"next: lopkit moe {follow} --preset {args.preset} --out {shlex.quote(str(args.out))}")
    return EXIT_OK


def _print_targets(out_dir: Path) -> None:
    """Print the target table written with the report, if any."""
    from lopkit.moe.report import FIGURE_DIR

    path = Path(out_dir) / FIGURE_DIR / "targets.csv"
    if path.exists():
        import pandas as pd

        with pd.option_context("display.width", 220, "display.max_colwidth", 110):
            print(pd.read_csv(path, keep_default_na=False).to_string(index=False))


def _report(args: argparse.Namespace) -> int:
    """Rebuild the HTML report of an experiment folder, or one merged report of several (one per seed)."""
    from lopkit.moe.report import build_moe_report

    try:
        result = build_moe_report(args.experiment_dirs, args.output)
    except (FileNotFoundError, ConfigError) as err:
        return _error(str(err))
    print(f"wrote {result.html_path} and {len(result.png_paths)} PNGs")
    if not result.targets.empty:
        import pandas as pd

        with pd.option_context("display.width", 220, "display.max_colwidth", 110):
            print(result.targets.to_string(index=False))
    return EXIT_OK


def _dial(args: argparse.Namespace) -> int:
    """``lopkit moe dial MODEL --k 1,2,4``: a table per k (perplexity, MC accuracy, agreement with k_pre, tokens/s,
    FLOP proxy) for a Hugging Face MoE checkpoint folder or a lopkit MoE model."""
    apply_threads(args)
    from lopkit.moe.hf import DialError, dial_table, format_dial_table, load_dial_model, load_mc_tasks

    try:
        ks = [int(part) for part in str(args.k).split(",") if part.strip()]
    except ValueError:
        return _error(f"--k must be a comma-separated list of integers such as 1,2,4,8, got {args.k!r}")
    if not ks:
        return _error("--k needs at least one k, e.g. --k 1,2,4,8")
    text_path = Path(args.text).expanduser()
    if not text_path.is_file():
        return _error(f"text file {text_path} not found; pass --text FILE (plain text to measure perplexity on)")
    try:
        model = load_dial_model(args.model, args.run)
        bad = [k for k in ks if not 1 <= k <= model.n_experts]
        if bad:
            return _error(f"k={bad[0]} is outside 1..{model.n_experts} (the number of experts per layer of "
                          f"{model.name}); pick --k values in that range")
        tasks = load_mc_tasks(args.tasks) if args.tasks else None
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = dial_table(model, ks, text_path.read_text(encoding="utf-8", errors="replace"), tasks,
                              context_len=args.context, max_tokens=args.max_tokens)
        for message in {str(w.message) for w in caught if issubclass(w.category, UserWarning)}:
            print(f"warning: {message}", file=sys.stderr)
    except DialError as err:
        return _error(str(err))
    print(format_dial_table(model, rows))
    return EXIT_OK


def _finetune_hf(args: argparse.Namespace) -> int:
    """``lopkit moe finetune-hf MODEL --data text.txt --steps N --out DIR``: PHDS fine-tuning of a Hugging Face MoE
    checkpoint folder, saved every ``--save-every`` steps (rerun the same command to resume)."""
    import os

    import torch

    from lopkit.configs import build_config
    from lopkit.moe.hf import DialError, load_dial_model
    from lopkit.moe.hf_phds import STATE_FILE, HfPhdsConfig, HfPhdsTrainer, save_phds_model, text_rows

    try:
        apply_threads(args)
        values: dict[str, Any] = {"steps": args.steps}
        for name in ("batch_size", "anchor_k", "anchor_fraction", "eps", "aux_loss_coef", "lr", "warmup_steps",
                     "weight_decay", "grad_clip"):
            if getattr(args, name) is not None:
                values[name] = getattr(args, name)
        if args.k_train is not None:
            values["k_train"] = args.k_train
        if args.per_k_norms:
            values["per_k_norms"] = True
        config = build_config(HfPhdsConfig, values)
        if args.save_every < 1:
            raise ConfigError(f"--save-every must be >= 1, got {args.save_every}")
        if args.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    except ConfigError as err:
        return _error(str(err))
    data = Path(args.data).expanduser()
    if not data.is_file():
        return _error(f"data file {data} not found; pass --data FILE (plain text to fine-tune on)")
    text = data.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return _error(f"data file {data} holds no text; pass a plain-text file to fine-tune on")
    out = Path(args.out).expanduser()
    if out.resolve() == Path(args.model).expanduser().resolve():
        return _error("--out is the model folder itself; write the fine-tuned model to a new folder")
    try:
        loaded = load_dial_model(args.model)
        if loaded.kind != "hf":
            return _error(f"{args.model} is a lopkit MoE model; fine-tune it with 'lopkit moe finetune' (finetune-hf "
                          f"takes a Hugging Face checkpoint folder with config.json)")
        rows = text_rows(loaded.encode(text), args.context)
        trainer = HfPhdsTrainer(loaded.model, rows, config, args.seed)
        state_path = out / STATE_FILE
        if state_path.is_file():
            trainer.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False))
            print(f"resuming {out} at step {trainer.step} of {config.steps}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        while not trainer.done:
            records = trainer.run(min(args.save_every, config.steps - trainer.step))
            partial = state_path.with_name(STATE_FILE + ".tmp")
            torch.save(trainer.state_dict(), partial)
            os.replace(partial, state_path)  # a crash never leaves a half-written state
            mean = sum(r["lm_loss"] for r in records) / len(records)
            print(f"step {trainer.step}/{config.steps}: lm_loss {mean:.4f} (k: "
                  f"{','.join(str(int(r['k'])) for r in records)})", file=sys.stderr)
        trainer.finish()
        save_phds_model(trainer, out, source=args.model)
    except (DialError, ConfigError) as err:
        return _error(str(err))
    except KeyboardInterrupt:
        print(f"interrupted; the last saved step is kept in {out / STATE_FILE}: rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"fine-tuned {loaded.name} (k_pre={trainer.k_pre}, k_train={list(trainer.k_train)}, anchor_k="
          f"{config.anchor_k}, {trainer.step} steps) -> {out}")
    return EXIT_OK


def _add_stage_options(parser: argparse.ArgumentParser, variants: bool) -> None:
    """Options shared by the stage commands."""
    parser.add_argument("--preset", default="default", choices=["smoke", "mini", "default", "paper"],
                        help="size preset (default: %(default)s; smoke ~30 s, mini ~20-25 min, default ~3 h on 2 cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"experiment folder holding results.sqlite (default: {DEFAULT_OUT})")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", default="1", metavar="N",
                       help="seeds: a count (3 = seeds 0..2), a list (0,1,2) or a range (0-2) (default: 1)")
    seeds.add_argument("--seed-list", default=None, metavar="S,S,...", help="explicit seeds, e.g. 0,1,2")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config field; prefix with pretrain./finetune./eval. to target one stage, "
                             "e.g. --set pretrain.steps=500 finetune.lr=1e-3 (a bare KEY goes to every stage that "
                             "has it)")
    add_threads_flag(parser)
    if variants:
        parser.add_argument("--variant", dest="variants", action="append", default=None, metavar="LABEL",
                            help="only this fine-tune variant (repeatable): oracle1..oracleK, naive, phds, "
                                 "phds_anchor, phds_anchor_eps0, phds_anchor_shared_norms (default: all)")
        ablation = parser.add_mutually_exclusive_group()
        ablation.add_argument("--ablations", dest="ablations", action="store_true", default=None,
                              help="add the eps=0 and shared-norm ablations (default: only with --preset default/paper)")
        ablation.add_argument("--no-ablations", dest="ablations", action="store_false",
                              help="leave the ablations out")
    else:
        parser.set_defaults(variants=None, ablations=None)
    add_progress_flags(parser)
    parser.set_defaults(func=_run_stages)


def register(subparsers: Any) -> None:
    """Add the ``moe`` command group (pretrain, finetune, evaluate, run, report)."""
    moe = subparsers.add_parser(
        "moe", help="MoE-PHDS: pretrain a byte-level MoE, fine-tune oracles/naive/PHDS, evaluate at every k",
        description=textwrap.fill(
            "Reproduce MoE-PHDS at small scale on CPU. Every stage stores its runs in OUT/results.sqlite and is "
            "resumable: rerunning a command skips finished runs and resumes an interrupted one. 'run' chains "
            "pretrain -> finetune -> evaluate -> report.", width=78),
        epilog="examples:\n"
               "  lopkit moe run --preset smoke --out runs/moe_smoke\n"
               "  lopkit moe pretrain --preset mini --out runs/moe_mini --threads 2\n"
               "  lopkit moe finetune --preset mini --out runs/moe_mini --variant phds_anchor\n"
               "  lopkit moe evaluate --preset mini --out runs/moe_mini\n"
               "  lopkit moe report runs/moe_mini\n"
               "  lopkit moe dial path/to/olmoe-checkpoint --k 2,4,6,8 --text wiki.txt --tasks qa.jsonl\n"
               "  lopkit moe finetune-hf path/to/olmoe-checkpoint --data sft.txt --steps 1000 --out olmoe-phds\n"
               "exit codes: 0 ok, 1 a run failed, 2 bad input, 130 interrupted (see docs/moe.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = moe.add_subparsers(dest="moe_command", metavar="STAGE")
    helps = {
        "pretrain": "pretrain the MoE at hard top-k_pre (stage 1)",
        "finetune": "SFT variants from the pretrain run: oracle1..K, naive, phds, phds_anchor (stage 2)",
        "evaluate": "evaluate the pretrained and fine-tuned models at every k, then write the report (stage 3)",
        "run": "every stage in turn (skips what is finished)",
    }
    for name, text in helps.items():
        stage = sub.add_parser(name, help=text, description=text)
        _add_stage_options(stage, variants=name != "pretrain")
    report = sub.add_parser("report", help="rebuild the HTML report of an experiment folder (or merge several)",
                            description="Write OUT/moe_report.html (self-contained) and PNGs/CSVs in OUT/moe_figures. "
                                        "Several folders (e.g. one store per seed, run as parallel processes) are "
                                        "merged into one report written to --output.")
    report.add_argument("experiment_dirs", type=Path, nargs="+", metavar="EXPERIMENT_DIR",
                        help="folder(s) holding results.sqlite")
    report.add_argument("-o", "--output", default=None,
                        help="HTML file (default: EXPERIMENT_DIR/moe_report.html; required for several folders)")
    report.set_defaults(func=_report)
    dial = sub.add_parser("dial", help="set top-k at inference on an MoE model and tabulate quality and cost per k",
                          description="Dial k on a Hugging Face MoE checkpoint folder (OLMoE, Qwen2-MoE, Mixtral or "
                                      "any model with routers in their pattern) or a lopkit MoE model (experiment "
                                      "folder or saved state): perplexity, MC accuracy, agreement with the k_pre "
                                      "outputs, tokens/s and a FLOP proxy per k.")
    dial.add_argument("model", help="HF checkpoint folder (config.json), lopkit experiment folder (results.sqlite) "
                                    "or saved lopkit MoE state (.pt)")
    dial.add_argument("--k", default="1,2,4,8", help="ks to evaluate, comma-separated (default: %(default)s)")
    dial.add_argument("--text", required=True, metavar="FILE", help="plain text for perplexity and token agreement")
    dial.add_argument("--tasks", default=None, metavar="FILE",
                      help='JSONL multiple-choice tasks: {"context": ..., "choices": [...], "answer": i} per line')
    dial.add_argument("--run", default=None, help="run id or label in a lopkit experiment folder (default: pretrain)")
    dial.add_argument("--context", type=int, default=128, help="tokens per window (default: %(default)s)")
    dial.add_argument("--max-tokens", type=int, default=8192, help="tokens of the text to use (default: %(default)s)")
    add_threads_flag(dial)
    dial.set_defaults(func=_dial)
    tune = sub.add_parser("finetune-hf", help="PHDS fine-tuning of a Hugging Face MoE checkpoint (multi-k soft mask)",
                          description="PHDS fine-tuning of a Hugging Face MoE causal LM (OLMoE, Qwen2-MoE, Mixtral or "
                                      "routers in their pattern) on a text file: k sampled per step from K_train "
                                      "(anchor curriculum optional), eps soft mask, load-balancing loss at the "
                                      "sampled k. Saves OUT as a Hugging Face checkpoint; rerun to resume.")
    tune.add_argument("model", help="Hugging Face checkpoint folder (config.json)")
    tune.add_argument("--data", required=True, metavar="FILE", help="plain text to fine-tune on (next-token loss)")
    tune.add_argument("--steps", type=int, required=True, metavar="N", help="optimiser steps")
    tune.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (checkpoint + state)")
    tune.add_argument("--k-train", dest="k_train", default=None, metavar="K,K,...",
                      help="K_train, e.g. 2,3,4 (default: k_pre//2..k_pre)")
    tune.add_argument("--anchor-k", dest="anchor_k", type=int, default=None, metavar="K",
                      help="curriculum anchor k (default: no curriculum)")
    tune.add_argument("--anchor-fraction", dest="anchor_fraction", type=float, default=None, metavar="F",
                      help="fraction of the steps, at the end, of the anchor phase (default: 0.06)")
    tune.add_argument("--eps", type=float, default=None, help="soft-mask weight of the dropped experts (default: 1e-6)")
    tune.add_argument("--per-k-norms", dest="per_k_norms", action="store_true",
                      help="one copy of every norm per training k (saved in lopkit_per_k_norms.pt)")
    tune.add_argument("--aux-loss-coef", dest="aux_loss_coef", type=float, default=None,
                      help="load-balancing loss coefficient (default: the model's router_aux_loss_coef)")
    tune.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: 1e-5)")
    tune.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=None, help="linear warm-up steps")
    tune.add_argument("--weight-decay", dest="weight_decay", type=float, default=None, help="AdamW weight decay")
    tune.add_argument("--grad-clip", dest="grad_clip", type=float, default=None, help="gradient-norm clip (0 = off)")
    tune.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="rows per step (default: 8)")
    tune.add_argument("--context", type=int, default=128, help="tokens per row (default: %(default)s)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the k and batch draws (default: %(default)s)")
    tune.add_argument("--save-every", dest="save_every", type=int, default=50, metavar="N",
                      help="steps between saved states (default: %(default)s)")
    add_threads_flag(tune)
    tune.set_defaults(func=_finetune_hf)
    moe.set_defaults(func=lambda _args: (moe.print_help(), EXIT_USAGE)[1])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lopkit.moe.cli STAGE ...`` (the same as ``lopkit moe STAGE ...``)."""
    parser = argparse.ArgumentParser(prog="lopkit")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(["moe", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
