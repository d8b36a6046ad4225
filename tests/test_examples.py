"""The scripts in examples/ run as documented (shortened by their own flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402  (run_ranks: the launcher shared with tests/test_distributed.py)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def test_ddp_cpu_example_keeps_two_ranks_identical(tmp_path):
    log = tmp_path / "out.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "examples" / "ddp_cpu.py"), "--tasks", "2", "--steps-per-task", "40",
               "--method", "cbp:replacement_rate=0.05:maturity=5"]
    [code] = ddp_worker.run_ranks(lambda attempt: [command], [log], _env(), cwd=tmp_path)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "task 1: train accuracy" in text, text[-3000:]
    assert "cbp: largest weight difference between the 2 ranks: 0.0" in text, text[-3000:]


def test_custom_reset_example_runs_with_and_without_its_rule():
    outputs = []
    for flags in ([], ["--no-reset"]):
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_reset.py"), "--tasks", "3",
                               "--steps-per-task", "60", "--lr", "1e-2", *flags],
                              env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [line for line in done.stdout.splitlines() if line.startswith("task ")]
        assert [line.split(":")[0] for line in lines] == ["task 0", "task 1", "task 2"]
        outputs.append(lines)
    assert outputs[0][0] == outputs[1][0]  # the same first task: the rule acts at task boundaries only
    assert outputs[0][1:] != outputs[1][1:]  # and then changes the training
