"""Last C-STORE -> SEG for a 300-slice 512² study sent at a modality's pace, a few times in a row.

The benchmark's `last_store_to_seg` part alone (its three repeats take ~25 minutes with the rest
of `thighseg bench`; this takes ~30 s a run): one embedded Triton serving the shipped weights, a
fresh listener with its defaults (streaming, head start, 1 s completion wait) for each run.

    .venv/bin/python scripts/latency_at_rate.py --runs 3 --rate 20 --out latency.json
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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="latency-"))
    bench_repository(models.REPOSITORY, args.model, work / "repository")
    files = write_series(
        phantom.generate(8100, size=512, slices=300, slice_spacing=5.0), work / "study"
    )
    ports = Ports(free_port(), free_port(), free_port())
    runs = []
    with EmbeddedTriton(work / "repository", ports, log_file=work / "triton.log") as server:
        for _ in tqdm(range(args.runs), desc=f"last C-STORE -> SEG at {args.rate:g}/s"):
            runs.append(
                last_store_to_seg(files, server.http_url, work, args.model, args.rate, True, 1.0)
            )
            args.out.write_text(json.dumps({"runs": runs}, indent=1))  # each run as it ends
    seconds = [run["seconds_last_store_to_seg"] for run in runs]
    summary = {"median_s": statistics.median(seconds), "seconds": seconds, "runs": runs}
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"last C-STORE -> SEG: median {summary['median_s']} s of {seconds}")


if __name__ == "__main__":
    main()
