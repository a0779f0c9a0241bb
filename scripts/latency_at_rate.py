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
import json
import statistics
import tempfile
from pathlib import Path

from tqdm import tqdm

from thighseg.apps.bench import bench_repository
from thighseg.apps.ingest import last_store_to_seg
from thighseg.core.constants import DEFAULT_MODEL
from thighseg.core.ports import free_port
from thighseg.learning import models
from thighseg.serving.embedded_triton import EmbeddedTriton, Ports
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import write_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0, help="instances/s")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare-with", type=Path, help="another checkout's listener, alternated")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="latency-"))
    bench_repository(models.REPOSITORY, args.model, work / "repository")
    files = write_series(
        phantom.generate(8100, size=512, slices=300, slice_spacing=5.0), work / "study"
    )
    ports = Ports(free_port(), free_port(), free_port())
    listeners = {"this checkout": None} | (
        {str(args.compare_with): args.compare_with.resolve()} if args.compare_with else {}
    )
    runs: dict[str, list[dict]] = {label: [] for label in listeners}
    with EmbeddedTriton(work / "repository", ports, log_file=work / "triton.log") as server:
        for _ in tqdm(range(args.runs), desc=f"last C-STORE -> SEG at {args.rate:g}/s"):
            for label, checkout in listeners.items():
                run = last_store_to_seg(
                    files, server.http_url, work, args.model, args.rate, True, 1.0, True, checkout
                )
                runs[label].append(run)
                args.out.write_text(json.dumps({"runs": runs}, indent=1))  # each run as it ends
    summary: dict = {}
    for label, done in runs.items():
        seconds = [run["seconds_last_store_to_seg"] for run in done]
        summary[label] = {"median_s": statistics.median(seconds), "seconds": seconds, "runs": done}
        print(f"{label}: last C-STORE -> SEG median {statistics.median(seconds)} s of {seconds}")
    args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
