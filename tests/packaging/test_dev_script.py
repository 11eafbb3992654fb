"""./dev: every job explains itself, benchmarks are listed, and none overwrites a committed result."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "sync_server")


def dev(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "dev"), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_help_lists_the_jobs_the_benchmarks_and_quick():
    out = dev("help")
    assert out.returncode == 0
    for word in ("serve", "demo", "test", "bench NAME", "lock", "bundle", "--quick", "--out", *BENCHMARKS):
        assert word in out.stdout, word


def test_bench_without_a_known_name_lists_the_benchmarks():
    for args, first in ((("bench",), "usage: ./dev bench NAME"),
                        (("bench", "nosuch"), "./dev bench: no benchmark named 'nosuch'"),
                        (("bench", "../tests/conftest"), "./dev bench: no benchmark named")):
        out = dev(*args)
        assert out.returncode == 2 and out.stderr.startswith(first), out.stderr
        assert "unbound variable" not in out.stderr and "can't open file" not in out.stderr
        assert all(b in out.stderr for b in BENCHMARKS)


def test_no_benchmark_writes_into_the_committed_results_by_default():
    outs = 0
    for path in (ROOT / "bench").glob("*.py"):
        text = path.read_text()
        for m in re.finditer(r'add_argument\("--out"', text):
            default = text[m.end():].split("help=")[0]          # the option's type and default
            assert "default=" in default and "results" not in default.lower(), (path.name, default)
            outs += 1
    assert outs >= 7
    assert "bench/results/" not in (ROOT / "bench" / "gpu_check.sh").read_text().split("RESULTS=")[1].split("\n")[0]
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/out/load.md"], cwd=ROOT)
    assert ignored.returncode == 0, "bench/out/ must be git-ignored"
