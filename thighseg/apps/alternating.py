"""What the A/B scripts share (`scripts/latency_at_rate.py`, `scripts/peak_rss.py`): the
benchmark's 300-slice 512² study, one embedded Triton serving the shipped weights, and the
listeners to alternate on it (this checkout's, and another's), so that the machine's drifting
speed affects both alike."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from thighseg.apps.bench import bench_repository
from thighseg.core import machine
from thighseg.core.ports import free_port
from thighseg.learning import models
from thighseg.serving.embedded_triton import EmbeddedTriton, Ports
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import write_series

THIS_CHECKOUT = "this checkout"


@dataclass(frozen=True)
class Bench:
    """The study's files, the server, a work folder, and the listeners by label (the checkout
    each runs from; None: this one)."""

    work: Path
    files: list[Path]
    triton_url: str
    listeners: dict[str, Path | None]


@contextmanager
def served(model: str, compare_with: Path | None, prefix: str) -> Iterator[Bench]:
    """The study written and `model` served, for as long as the block runs."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    bench_repository(models.REPOSITORY, model, work / "repository")
    files = write_series(
        phantom.generate(8100, size=512, slices=300, slice_spacing=5.0), work / "study"
    )
    listeners = {THIS_CHECKOUT: None} | (
        {str(compare_with): compare_with.resolve()} if compare_with else {}
    )
    ports = Ports(free_port(), free_port(), free_port())
    with EmbeddedTriton(work / "repository", ports, log_file=work / "triton.log") as server:
        yield Bench(work, files, server.http_url, listeners)


def alternate(
    bench: Bench,
    runs: int,
    measure: Callable[[str, Path | None, int], dict],
    figure: str,
    out: Path,
    description: str,
) -> dict:
    """`measure(label, checkout, run)` for each listener in turn, `runs` times; every run saved
    to `out` as it ends, then each listener's runs with the median of their `figure` and the CPU
    they ran on."""
    done: dict[str, list[dict]] = {label: [] for label in bench.listeners}
    for run in tqdm(range(runs), desc=description):
        for label, checkout in bench.listeners.items():
            done[label].append(measure(label, checkout, run))
            out.write_text(json.dumps({"runs": done}, indent=1))
    summary, cpu = {}, machine.described(machine.cpu())
    for label, measured in done.items():
        figures = [one[figure] for one in measured]
        summary[label] = {
            "median": statistics.median(figures),
            figure: figures,
            "measured_on": cpu,
            "runs": measured,
        }
        print(f"{label}: {figure} median {statistics.median(figures)} of {figures}")
    out.write_text(json.dumps(summary, indent=1))
    return summary
