"""`python -m bench.smoke`: CI's benchmark smoke. Runs `bench.run --quick` and fails unless
every contender started, every measurement produced a result, and the outputs exist.

It checks that the kit and every data path work end to end, not how fast they are: a
2-core CI machine is too noisy for thresholds, and performance is claimed only from full
runs (README, Performance).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def problems(results: dict[str, Any], out: Path) -> list[str]:
    """What is wrong with a quick run's results (pure; empty when all is well)."""
    found = [f"contender {c} skipped: {why}" for c, why in results.get("skipped", {}).items()]
    if results.get("meta", {}).get("error"):
        found.append(f"run failed: {results['meta']['error']}")
    measurements = results.get("measurements", [])
    if not measurements:
        found.append("no measurement was made")
    found += [f"{m['workload']} {m['contender']} round {m['round']}: {m['error']}" for m in measurements if m.get("error")]
    found += [f"missing {name}" for name in ("results.md", "results.png") if not (out / name).exists()]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    out = Path(tempfile.mkdtemp(prefix="pyproxy-bench-smoke-"))
    run = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out), *(argv or ())],
                         timeout=600, check=False)
    results_file = out / "results.json"
    if not results_file.exists():
        print(f"bench smoke: no results (bench.run exited {run.returncode})", file=sys.stderr)
        return 1
    found = problems(json.loads(results_file.read_text()), out)
    if run.returncode:
        found.append(f"bench.run exited {run.returncode}")
    for problem in found:
        print(f"bench smoke: {problem}", file=sys.stderr)
    print(f"bench smoke: {'FAILED' if found else 'ok'}; results in {out}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
