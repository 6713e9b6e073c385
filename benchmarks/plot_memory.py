"""Plot peak memory against sequence length from ``memory_and_time.py --json`` files.

    python benchmarks/plot_memory.py benchmarks/results/sft.json benchmarks/results/sft_long.json \\
        --objective sft --output benchmarks/results/sft_memory.png

Measures nothing: it draws the points of earlier runs, one line per method (a method measured in
several files gets all its lengths; a length measured twice keeps the later file's peak). The
peaks are those of the tables: what a step allocates, without the resident parameters. Needs
matplotlib (``pip install -e '.[demo]'``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from train_long_context import plot_memory  # noqa: E402


def peaks_by_method(paths: list[str], objective: str) -> dict[str, dict[int, int]]:
    peaks: dict[str, dict[int, int]] = {}
    for path in paths:
        for point in json.loads(Path(path).read_text())["points"]:
            if point["objective"] == objective and point["peak_bytes"]:
                peaks.setdefault(point["method"], {})[point["length"]] = point["peak_bytes"]
    return peaks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="files written by memory_and_time.py --json")
    parser.add_argument("--objective", default="sft")
    parser.add_argument("--output", default="memory.png")
    parser.add_argument("--title", default=None, help="default: the objective and the runs' model")
    args = parser.parse_args(argv)

    peaks = peaks_by_method(args.json, args.objective)
    if not peaks:
        parser.error(f"no measured {args.objective!r} points in {args.json}")
    setup = json.loads(Path(args.json[0]).read_text())["setup"].split(";")[0]
    results = [SimpleNamespace(name=method, peak_bytes=by_length) for method, by_length in peaks.items()]
    lengths = sorted({length for by_length in peaks.values() for length in by_length})
    if not plot_memory(results, lengths, args.output, args.title or f"{args.objective.upper()} step, {setup}"):
        raise SystemExit("matplotlib is not installed (pip install matplotlib)")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
