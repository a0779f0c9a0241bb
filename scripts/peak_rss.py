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
import json
import statistics
import tempfile
from pathlib import Path

from tqdm import tqdm

from thighseg.apps.bench import bench_repository, fresh_listener
from thighseg.core.constants import DEFAULT_MODEL
from thighseg.core.ports import free_port
from thighseg.learning import models
from thighseg.serving.embedded_triton import EmbeddedTriton, Ports
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import write_series

MB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seg-in-listener", action="store_true", help="the one-process mode")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare-with", type=Path, help="another checkout's listener, alternated")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peak-rss-"))
    bench_repository(models.REPOSITORY, args.model, work / "repository")
    files = write_series(
        phantom.generate(8100, size=512, slices=300, slice_spacing=5.0), work / "study"
    )
    voxel_bytes = 300 * 512 * 512 * 2
    options = ("--seg-in-listener",) if args.seg_in_listener else ()
    ports = Ports(free_port(), free_port(), free_port())
    listeners = {"this checkout": None} | (
        {str(args.compare_with): args.compare_with.resolve()} if args.compare_with else {}
    )
    runs: dict[str, list[dict]] = {label: [] for label in listeners}
    with EmbeddedTriton(work / "repository", ports, log_file=work / "triton.log") as server:
        for k in tqdm(range(args.runs), desc="peak RSS of a fresh listener"):
            for n, (label, checkout) in enumerate(listeners.items()):
                seconds, _, report, peaks = fresh_listener(
                    files, server.http_url, work, args.model, f"{k}-{n}", None, options, checkout
                )
                runs[label].append(
                    {
                        "seconds_first_store_to_seg": round(seconds, 2),
                        "stage_seconds": report.stage_seconds,
                        "process_peak_rss_mb": [round(b / MB, 1) for b in peaks.values()],
                        "peak_rss_mb": round(sum(peaks.values()) / MB, 1),
                        "peak_rss_over_voxel_bytes": round(sum(peaks.values()) / voxel_bytes, 2),
                    }
                )
                args.out.write_text(json.dumps({"runs": runs}, indent=1))  # each run as it ends
    summary: dict = {"options": list(options)}
    for label, done in runs.items():
        ratios = [run["peak_rss_over_voxel_bytes"] for run in done]
        summary[label] = {"median_ratio": statistics.median(ratios), "runs": done}
        print(f"{label}: peak RSS / voxel bytes median {statistics.median(ratios)} of {ratios}")
    args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
