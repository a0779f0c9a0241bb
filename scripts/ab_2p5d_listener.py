"""The listener with the 2D and the 2.5D Dense U-Net side by side, in one run on this machine.

Two embedded Triton servers (one per weights file; a model's versions share one input, so the two
cannot be versions of one model) and, alternating, a 300-slice 512² study: last C-STORE -> SEG at
20 instances/s (streaming and head start, the defaults) and the listener's peak RSS over a study
sent at full speed.

    .venv/bin/python scripts/ab_2p5d_listener.py OLD_2D.pt thighseg/weights/denseunet.pt \
        --out docs/benchmark/ab_2d_vs_2p5d_listener.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from thighseg.apps.bench import run_whole_study
from thighseg.apps.ingest import last_store_to_seg
from thighseg.core.ports import free_port
from thighseg.export.onnx_export import export_to_new_repository
from thighseg.serving.embedded_triton import EmbeddedTriton, Ports
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import write_series

MODEL = "denseunet"


def serve(weights: Path, work: Path) -> EmbeddedTriton:
    repository = export_to_new_repository(MODEL, work / f"repository-{weights.stem}", weights)
    ports = Ports(free_port(), free_port(), free_port())
    return EmbeddedTriton(repository, ports, log_file=work / f"{weights.stem}.log").start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flat", type=Path, help="2D weights")
    parser.add_argument("stacked", type=Path, help="2.5D weights")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ab-2p5d-"))
    study = phantom.generate(8100, size=512, slices=300, slice_spacing=5.0)
    files, voxel_bytes = write_series(study, work / "study"), study.hu.size * 2
    del study
    warmup = write_series(
        phantom.generate(8102, size=512, slices=12, slice_spacing=5.0), work / "w"
    )
    servers = {"2d": serve(args.flat, work), "2.5d": serve(args.stacked, work)}
    results: dict = {label: {"latency_20_per_s": [], "whole_study": []} for label in servers}
    try:
        for repeat in range(args.repeats):
            for label, server in servers.items():
                run = work / f"{label}-{repeat}"
                latency = last_store_to_seg(files, server.http_url, run, MODEL, 20.0, True, 1.0)
                results[label]["latency_20_per_s"].append(latency)
                if repeat == 0:
                    whole = run_whole_study(
                        files, warmup, server.http_url, MODEL, run / "whole", voxel_bytes
                    )
                    results[label]["whole_study"].append(whole)
                args.out.write_text(json.dumps(results, indent=2))
    finally:
        for server in servers.values():
            server.stop()
    for label, figures in results.items():
        seconds = [r["seconds_last_store_to_seg"] for r in figures["latency_20_per_s"]]
        figures["median_last_store_to_seg_s"] = statistics.median(seconds)
        print(label, "last C-STORE -> SEG at 20/s:", seconds, "median", statistics.median(seconds))
        for whole in figures["whole_study"]:
            print(label, "peak RSS / voxel bytes:", whole["peak_rss_over_voxel_bytes"])
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
