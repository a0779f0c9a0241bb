"""Last C-STORE -> SEG for a 300-slice 512² study sent at a modality's pace, a few times in a row.

The benchmark's `last_store_to_seg` part alone (its three repeats take ~25 minutes with the rest
of `thighseg bench`; this takes ~30 s a run): one embedded Triton serving the shipped weights, a
fresh listener with its defaults (streaming, head start, 1 s completion wait) for each run.

    .venv/bin/python scripts/latency_at_rate.py --runs 3 --rate 20 --out latency.json

`--compare-with DIR` alternates each run with one of the listener of another checkout (e.g.
`git worktree add /tmp/before REV`), both on the same server and study: an A/B that the machine's
drifting speed affects alike.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thighseg.apps.alternating import alternate, served
from thighseg.apps.ingest import last_store_to_seg
from thighseg.core.constants import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0, help="instances/s")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare-with", type=Path, help="another checkout's listener, alternated")
    args = parser.parse_args()
    with served(args.model, args.compare_with, "latency-") as bench:
        alternate(
            bench,
            args.runs,
            lambda _, checkout, __: last_store_to_seg(
                bench.files,
                bench.triton_url,
                bench.work,
                args.model,
                args.rate,
                True,
                1.0,
                True,
                checkout,
            ),
            "seconds_last_store_to_seg",
            args.out,
            f"last C-STORE -> SEG at {args.rate:g}/s",
        )


if __name__ == "__main__":
    main()
