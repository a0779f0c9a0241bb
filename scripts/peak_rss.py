"""Peak RSS of a fresh listener (and its SEG process) processing a 300-slice 512² study, a few
times in a row: the benchmark's `whole_study` memory figures alone.

    .venv/bin/python scripts/peak_rss.py --runs 3 --out rss.json [--seg-in-listener]

One embedded Triton serves the shipped weights; each run starts a fresh listener and pushes the
study at full speed over one association. `--compare-with DIR` alternates each run with one of
the listener of another checkout (e.g. `git worktree add /tmp/before REV`), both on the same
server and study.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thighseg.apps.alternating import alternate, served
from thighseg.apps.bench import fresh_listener
from thighseg.core.constants import DEFAULT_MODEL

MB = 2**20
VOXEL_BYTES = 300 * 512 * 512 * 2  # the study's, 16-bit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seg-in-listener", action="store_true", help="the one-process mode")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare-with", type=Path, help="another checkout's listener, alternated")
    args = parser.parse_args()
    options = ("--seg-in-listener",) if args.seg_in_listener else ()
    with served(args.model, args.compare_with, "peak-rss-") as bench:

        def measure(label: str, checkout: Path | None, run: int) -> dict:
            name = f"{run}-{'a' if checkout is None else 'b'}"
            run = fresh_listener(
                bench.files, bench.triton_url, bench.work, args.model, name, None, options, checkout
            )
            peaks = run.peaks.values()
            return {
                "seconds_first_store_to_seg": round(run.seconds, 2),
                "stage_seconds": run.report.stage_seconds,
                "process_peak_rss_mb": [round(b / MB, 1) for b in peaks],
                "peak_rss_mb": round(sum(peaks) / MB, 1),  # each process's own peak, summed
                "peak_rss_over_voxel_bytes": round(sum(peaks) / VOXEL_BYTES, 2),
                "together_peak_rss_mb": round(run.together_peak / MB, 1),  # at once, sampled
                "together_peak_rss_over_voxel_bytes": round(run.together_peak / VOXEL_BYTES, 2),
            }

        alternate(
            bench,
            args.runs,
            measure,
            "peak_rss_over_voxel_bytes",
            args.out,
            "peak RSS of a fresh listener",
        )


if __name__ == "__main__":
    main()
