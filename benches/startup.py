"""Start-up time: `import cellrank_fm` and `cellrank --help`, each in a fresh interpreter.

Peer in the same run: the bare interpreter (`python -c pass`), the floor under both figures.
Each figure is the fastest of `--repeat` runs (the least disturbed by other jobs on the cores),
with the median beside it.

    python benches/startup.py --repeat 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(argv: list[str], repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    python = sys.executable
    cellrank = str(Path(python).parent / "cellrank")
    runs = {
        "python -c pass (peer: the interpreter alone)": [python, "-c", "pass"],
        "python -c 'import cellrank_fm'": [python, "-c", "import cellrank_fm"],
        "cellrank --help": [cellrank, "--help"],
    }
    load = os.getloadavg()[0]
    print(f"start-up, {args.repeat} runs each, load average {load:.1f}, {os.cpu_count()} CPUs\n")
    print("| what | fastest | median |")
    print("|---|---|---|")
    for name, argv in runs.items():
        s = timed(argv, args.repeat)
        print(f"| `{name}` | {min(s):.3f} s | {statistics.median(s):.3f} s |")


if __name__ == "__main__":
    main()
