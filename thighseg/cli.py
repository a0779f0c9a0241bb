"""The `thighseg` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import thighseg
from thighseg.core.constants import (
    AE_TITLE,
    BENCH_PARTS,
    DEFAULT_MODEL,
    DICOM_PORT,
    EVALUATION_COHORTS,
    LISTENER_METRICS_PORT,
    TRITON_GRPC_PORT,
    TRITON_HTTP_PORT,
    TRITON_METRICS_PORT,
    TRITON_URL,
)
from thighseg.dicom_listener import config as listener_config
from thighseg.learning import models
from thighseg.learning.training import TrainConfig

if TYPE_CHECKING:  # the client layer is imported by the commands that use it
    from thighseg.client.volume import Backend, InferFn

DEFAULT_REPOSITORY = models.REPOSITORY
TRAIN_DEFAULTS = TrainConfig()
SIGNAL_POLL_S = 0.25  # longest a stop signal waits to be noticed


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(models.BUILDERS))


def _model_version(text: str) -> str:
    if text != "latest" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number or 'latest'")
    return text


def _at_least_one(text: str) -> int:
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _whole_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def _port(text: str) -> int:
    if not (text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def _seconds(text: str) -> float:
    """A finite duration of 0 s or more (a negative or NaN one would expire or wait for ever)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _ae_title(text: str) -> str:
    """An AE title as pynetdicom checks it (1-16 characters, no backslash or control character,
    not all spaces), checked here so that the mistake is one line, not a log line and an error."""
    from pynetdicom import _config  # its AE validator, the one the association uses

    valid, reason = _config.VALIDATORS["AE"](text)
    if not valid or not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not an AE title ({reason or 'all spaces'})")
    return text


def _triton_address(text: str) -> str:
    """host:port, what tritonclient is given (a leading http://, https:// or grpc:// is dropped)."""
    address = re.sub(r"^(https?|grpc)://", "", text).rstrip("/")
    try:
        parts = urllib.parse.urlsplit(f"//{address}")
        port = parts.port  # raises for a port that is not a number or out of range
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port ({error})") from None
    if not parts.hostname or not port or parts.path or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port (e.g. 127.0.0.1:8000)")
    return address


def _add_model_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-version",
        default="latest",
        type=_model_version,
        help="Triton model version to use, a number or 'latest' (resolved once at start; every "
        "report names it). Rollback: pass the previous number (default: %(default)s)",
    )


def _add_triton_ports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--http-port", type=_port, default=TRITON_HTTP_PORT, help="Triton HTTP port"
    )
    parser.add_argument(
        "--grpc-port", type=_port, default=TRITON_GRPC_PORT, help="Triton gRPC port"
    )
    parser.add_argument(
        "--metrics-port", type=_port, default=TRITON_METRICS_PORT, help="Triton metrics port"
    )


def cmd_phantom(args: argparse.Namespace) -> int:
    from thighseg.synthetic import phantom
    from thighseg.synthetic.ct_series import write_series

    study = phantom.generate(
        args.seed, size=args.size, slices=args.slices, slice_spacing=args.slice_spacing
    )
    paths = write_series(study, args.out)
    print(
        json.dumps(
            {"files": len(paths), "folder": str(args.out), **phantom.describe(study)}, indent=2
        )
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from thighseg.learning.training import TrainConfig, train

    init_choice = args.init or ("shipped" if args.data else "scratch")
    init = {"scratch": None, "shipped": str(models.weights_path(args.model))}.get(
        init_choice, init_choice
    )
    if init and not Path(init).is_file():
        raise SystemExit(f"error: --init {init_choice}: no weights file at {init}")
    synthetic = not args.data  # a user's dataset trains on its own cases only
    config = TrainConfig(
        model=args.model,
        subjects=args.subjects if synthetic else 0,
        slices_per_subject=args.slices,
        randomised_subjects=args.randomised_subjects if synthetic else 0,
        randomised_slices=args.randomised_slices,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        init=init,
        data=str(args.data) if args.data else None,
        fold=args.fold,
        validate_every=args.validate_every,
        patience=args.patience,
        context=args.context,
    )
    out = args.out
    if args.data and out is None:  # never overwrite the shipped weights with a site's model
        out = args.data / "models" / f"{args.model}_fold{args.fold}.pt"
    try:
        summary = train(config, out=out)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(_training_table(summary))
    return 0


def _training_table(summary: dict) -> str:
    """One summary table: held-out DSC per group for each validation set, and where it went."""
    sets = [k for k in ("validation", "validation_randomised") if summary.get(k)]
    table = [
        "| group | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
        *(
            f"| {group} | " + " | ".join(f"{summary[k][group]:.3f}" for k in sets) + " |"
            for group in ("extensor", "flexor", "adductor")
        ),
    ]
    lines = [
        *(table if sets else ["no validation subjects: nothing held out to score (--fold all)"]),
        f"weights {summary['weights']} (sha256 {summary['sha256'][:12]}…), best step "
        f"{summary['best_step']}, {summary['seconds']:.0f} s on {summary['device']}; "
        "card and JSON beside the weights",
    ]
    return "\n".join(lines)


def cmd_dataset_import(args: argparse.Namespace) -> int:
    from thighseg.apps.dataset_import import LabelMap, import_sources

    missing = [str(s) for s in args.sources if not s.exists()]
    if missing:
        raise SystemExit(f"error: no such source: {', '.join(missing)}")
    try:
        label_map = LabelMap.load(args.labels)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: label map: {error}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    report = import_sources(
        args.sources, label_map, args.out, fmt=args.format, subject_regex=args.subject_regex
    )
    if not report.written and not report.failed:
        sources = ", ".join(map(str, args.sources))
        raise SystemExit(
            f"error: no case found in {sources} (format {args.format}: an nnU-Net dataset, "
            "images/ + labels/ NIfTI pairs, DICOM CT + SEG or Slicer .seg.nrrd)"
        )
    print(report.table())
    if not report.written:
        raise SystemExit(f"error: no case imported into {args.out}: every case failed (above)")
    print(f"dataset in {args.out}; next: thighseg dataset split {args.out}")
    return 0


def cmd_dataset_split(args: argparse.Namespace) -> int:
    from thighseg.learning.dataset import make_splits, read_manifest, write_splits

    try:
        subjects = read_manifest(args.dataset).subjects()
        if args.split_file:
            splits = json.loads(args.split_file.read_text())
        else:
            splits = make_splits(subjects, args.folds, args.seed, args.test)
        path = write_splits(args.dataset, splits)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    for k, fold in enumerate(splits["folds"]):
        print(
            f"fold {k}: {len(fold['train'])} train, {len(fold['validation'])} validation subjects"
        )
    print(f"test: {len(splits.get('test', []))} subjects (never used in training); {path}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from thighseg.learning.card import refresh_cards

    written = refresh_cards(args.evaluation)
    if not written:
        raise SystemExit(f"error: no model in {args.evaluation} has weights with a training JSON")
    print("\n".join(str(path) for path in written))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from thighseg.export.build import export_model
    from thighseg.export.onnx_export import next_version

    model_dir = args.repository / models.triton_name(args.model)
    version = args.version or (next_version(model_dir) if args.weights else 1)
    if args.weights and not args.weights.is_file():
        raise SystemExit(f"error: --weights {args.weights}: no such file")
    existing = model_dir / str(version) / "model.onnx"
    if args.weights and args.version and existing.exists():
        raise SystemExit(
            f"error: version {version} exists ({existing}) and may be what a rollback returns "
            "to; export without --version writes the next one, or delete that folder first"
        )
    try:
        report = export_model(
            args.model,
            args.repository,
            args.format,
            args.weights,
            args.timing_cache,
            version=version,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(report, indent=2))
    print(
        f"exported {models.triton_name(args.model)} version {version}; a running `thighseg "
        f"serve` loads it within {EXPORT_POLL_S:.0f} s; `thighseg listen --model-version "
        f"{version}` pins it (default: latest)",
        file=sys.stderr,
    )
    return 0


def _stop_on_signal() -> threading.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _wait_for_signal() -> None:
    """Returns once SIGINT or SIGTERM arrives. Waits in short steps: a signal handled in another
    thread, or just before the main thread blocks, runs its Python handler only when the main
    thread next wakes (an unbounded wait could miss it for ever)."""
    stop = _stop_on_signal()
    while not stop.wait(SIGNAL_POLL_S):
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    from thighseg.serving.embedded_triton import EmbeddedTriton, Ports

    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    with EmbeddedTriton(args.repository, ports, log_file=args.log_file) as server:
        known = server.exported()
        print(
            f"triton ready: http {ports.http}, grpc {ports.grpc}, metrics {ports.metrics} "
            f"(pid {server.process.pid}); serving {', '.join(sorted(known))}; models exported "
            f"from now on are loaded within {EXPORT_POLL_S:.0f} s; Ctrl-C stops it",
            flush=True,
        )
        stop = _stop_on_signal()
        while not stop.wait(EXPORT_POLL_S):
            server.check_alive()  # a dead tritonserver ends `serve` with its exit code
            for line in server.load_new_exports(known):
                print(line, flush=True)
    return 0


EXPORT_POLL_S = 5.0


def _ready_segmenter(args: argparse.Namespace, wait_s: float = 0.0):
    """The served model through Triton, or None (with a message) when it is not ready in time."""
    from thighseg.client.triton import TritonSegmenter

    url = args.triton_url  # host:port (`_triton_address`)
    segmenter = TritonSegmenter(
        url,
        models.triton_name(args.model),
        protocol=args.protocol,
        version=args.model_version,
    )
    deadline = time.monotonic() + wait_s
    while not segmenter.is_ready() and time.monotonic() < deadline:
        time.sleep(2)
    if segmenter.is_ready():
        return segmenter
    live = segmenter.server_is_live()
    if live and segmenter.version:
        advice = (
            f"the server runs but does not serve version {segmenter.version}: export it, or pass "
            "a loaded one (the config's version_policy keeps the latest two)"
        )
    elif live:
        advice = (
            f"the server runs but does not serve it: `thighseg export --model {args.model}` "
            f"(a running `thighseg serve` loads it within {EXPORT_POLL_S:.0f} s)"
        )
    else:
        advice = "no server answers there: start one with `thighseg serve`"
    print(
        f"error: model {segmenter.model} is not ready at {url} ({args.protocol}); {advice}",
        file=sys.stderr,
    )
    return None


def cmd_listen(args: argparse.Namespace) -> int:
    from thighseg.dicom_listener.config import ListenerConfig
    from thighseg.dicom_listener.forward import Destination
    from thighseg.dicom_listener.service import Listener
    from thighseg.pipeline.stages import settings_for

    try:
        destinations = tuple(Destination.parse(text) for text in args.forward)
    except ValueError as error:
        raise SystemExit(f"error: --forward: {error}") from None
    segmenter = _ready_segmenter(args, args.triton_wait)
    if segmenter is None:
        return 2
    settings = settings_for(
        segmenter, args.model, batch_size=args.batch_size, concurrency=args.concurrency
    )
    if args.tta != "none":
        settings = dataclasses.replace(
            settings, infer=_with_tta(settings.infer, args.tta), tta=args.tta
        )
    config = ListenerConfig(
        spool_dir=args.spool,
        output_dir=args.out,
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        idle_s=args.idle,
        expiry_s=args.expiry,
        workers=args.workers,
        ingest_processes=args.ingest_processes,
        seg_process=not args.seg_in_listener,
        head_start=not args.no_head_start,
        stream_slices=args.stream_slices,
        metrics_port=args.metrics_port or None,
        allowed_calling_aets=tuple(args.allow_aet),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        network_timeout_s=args.network_timeout,
        drain_s=args.drain,
        destinations=destinations,
    )
    with Listener(config, settings):
        weights = (
            f", weights sha256 {settings.weights_sha256[:12]}" if settings.weights_sha256 else ""
        )
        print(
            f"listening as {args.ae_title} on {args.host}:{args.port}; {segmenter.model} version "
            f"{settings.model_version}{weights}; results in {args.out}",
            flush=True,
        )
        _wait_for_signal()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from thighseg.apps.demo import DemoOptions, print_summary, run_demo
    from thighseg.serving.embedded_triton import Ports

    options = DemoOptions(
        model=args.model,
        seed=args.seed,
        size=args.size,
        slices=args.slices,
        work_dir=args.work,
        ports=Ports(args.http_port, args.grpc_port, args.metrics_port),
        scp_port=args.port,
        repository=args.repository,
    )
    print_summary(run_demo(options))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from thighseg.apps.batch import run
    from thighseg.pipeline.stages import settings_for

    if args.triton_url:
        segmenter = _ready_segmenter(args)
        if segmenter is None:
            return 2
        settings = settings_for(segmenter, args.model)
    else:
        from thighseg.apps.local_inference import local_settings

        try:
            settings = local_settings(args.model, args.device, args.repository)
        except RuntimeError as error:
            raise SystemExit(f"error: {error}") from None
    processed, failures = run(args.inputs, args.out, settings)
    print(f"{len(processed)} studies processed; cohort table: {args.out / 'results.csv'}")
    if not processed and not list(args.out.glob("*/report.json")):
        print("error: no DICOM series or NIfTI volume found in the inputs", file=sys.stderr)
        return 1
    for key, reason in failures:
        print(f"failed: {key}: {reason}")
    return 1 if failures else 0


def _with_tta(backend: InferFn, tta: str) -> InferFn:
    """The backend with the test-time augmentation asked for (`--tta`)."""
    if tta == "flip":
        from thighseg.client.volume import flip_averaged

        return flip_averaged(backend)
    return backend


def _backend_with_tta(backend: Backend, tta: str) -> Backend:
    return dataclasses.replace(backend, infer=_with_tta(backend.infer, tta))


def _refuse_training_subjects(splits: dict, weights_by_cohort: dict[str, list[Path]]) -> None:
    """A score on subjects the weights were trained on is no held-out figure: refused, naming
    them (the training JSON beside each weights file lists its training subjects)."""
    subjects = {f"fold{k}": set(fold["validation"]) for k, fold in enumerate(splits["folds"])}
    subjects["test"] = set(splits.get("test", []))
    for cohort, weights in weights_by_cohort.items():
        for path in weights:
            record = Path(path).with_suffix(".json")
            if not record.is_file():
                continue
            seen = sorted(
                set(json.loads(record.read_text()).get("train_subjects", [])) & subjects[cohort]
            )
            if seen:
                raise SystemExit(
                    f"error: {Path(path).name} was trained on {len(seen)} subject(s) of {cohort} "
                    f"({', '.join(seen[:3])}): its scores there would not be held out; evaluate "
                    "the fold it was validated on, or only the test set (--fold all)"
                )


def cmd_evaluate_dataset(args: argparse.Namespace) -> int:
    """`evaluate --data`: each fold's validation subjects with that fold's weights, pooled, and
    the test subjects with the fold models' ensemble (or the one model given)."""
    from thighseg.apps.evaluation import (
        EvaluationConfig,
        dataset_cohorts,
        dataset_source,
        ensemble,
        run_evaluation,
        weights_label,
    )
    from thighseg.client.volume import Backend
    from thighseg.export.validation import torch_backend
    from thighseg.learning.dataset import fold_index, read_splits

    model = args.models[0]
    try:
        splits = read_splits(args.data)
        cohorts = dataset_cohorts(args.data, splits)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    folds = [c for c in cohorts if c.startswith("fold")]
    if args.triton_url:
        from thighseg.client.triton import TritonSegmenter

        served = TritonSegmenter(args.triton_url, models.triton_name(model), args.protocol)
        per_fold = [Backend(served.infer, served.context())]
        scored_with = [f"{model} served by Triton at {args.triton_url}"]
    else:
        weights = args.weights or [models.weights_path(model)]
        try:
            networks = [models.load_trained(model, w) for w in weights]
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        per_fold = [
            Backend(torch_backend(network), models.context_of(network)) for network in networks
        ]
        scored_with = [f"{model} weights {weights_label(Path(w))}" for w in weights]
    per_fold = [_backend_with_tta(backend, args.tta) for backend in per_fold]
    if len(per_fold) == len(folds):
        chosen = folds
        cohort_backends = {f: {model: b} for f, b in zip(folds, per_fold, strict=True)}
        try:
            test_backend = ensemble(per_fold)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    else:  # one model: only the fold it was validated on (--fold) and the test set
        if len(per_fold) != 1:
            raise SystemExit(
                f"error: {len(per_fold)} weights for {len(folds)} folds; give one per fold or one"
            )
        try:
            index = fold_index(splits, args.fold)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        chosen = [f"fold{index}"] if index is not None else []
        cohort_backends = {f: {model: per_fold[0]} for f in chosen}
        test_backend = per_fold[0]
    selected = {c: cohorts[c] for c in [*chosen, "test"] if c in cohorts}
    if not selected:
        raise SystemExit("error: nothing to evaluate: no fold chosen and no test subjects")
    if not args.triton_url:
        scored = dict(zip(chosen, weights, strict=True)) if len(weights) == len(chosen) else {}
        scored = {c: [scored[c]] if c in scored else weights for c in selected}
        _refuse_training_subjects(splits, scored)
    report = run_evaluation(
        {model: test_backend},
        args.out,
        EvaluationConfig(cohorts=tuple(selected), studies=0, slices=0, size=0, tta=args.tta),
        studies_by_cohort=selected,
        cohort_backends=cohort_backends,
        pooled=tuple(chosen) if len(chosen) > 1 else (),
        source=dataset_source(args.data, scored_with),
    )
    print((args.out / "evaluation.md").read_text())
    print(f"figures and JSON in {args.out}; cohorts: {', '.join(report['config']['cohorts'])}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from thighseg.apps.evaluation import EvaluationConfig, run_evaluation

    if args.data:
        args.models = args.models or [DEFAULT_MODEL]
        return cmd_evaluate_dataset(args)
    from thighseg.client.volume import Backend

    args.models = args.models or sorted(models.BUILDERS)
    backends = {}
    for model in args.models:
        if args.triton_url:
            from thighseg.client.triton import TritonSegmenter

            served = TritonSegmenter(args.triton_url, models.triton_name(model), args.protocol)
            backend = Backend(served.infer, served.context())
        else:
            from thighseg.apps.demo import ensure_exported
            from thighseg.export.validation import onnx_backend, onnx_context

            exported = ensure_exported(model, args.repository)
            backend = Backend(onnx_backend(exported), onnx_context(exported))
        backends[model] = _backend_with_tta(backend, args.tta)
    config = EvaluationConfig(
        cohorts=tuple(args.cohorts),
        studies=args.studies,
        slices=args.slices,
        size=args.size,
        field_of_view=args.fov,
        tta=args.tta,
    )
    report = run_evaluation(backends, args.out, config)
    print((args.out / "evaluation.md").read_text())
    print(f"figures and JSON in {args.out}; {len(report['models'])} model(s) evaluated")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from thighseg.apps.bench import BenchConfig, run_bench
    from thighseg.apps.demo import ensure_exported

    models = tuple(args.models)
    config = (
        BenchConfig.tiny(models)
        if args.tiny
        else BenchConfig.for_models(models, study_slices=args.study_slices)
    )
    for model in config.models:
        ensure_exported(model, args.repository)
    results = run_bench(args.out, args.repository, config, resume=args.resume, parts=args.parts)
    print(json.dumps(results["ratios"], indent=2))
    print(f"figures: {args.out}/bench.json, bench.md, perf_analyzer.png, baselines_ingest.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thighseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"thighseg {thighseg.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic thigh CT series with ground truth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="matrix size (pixels per side)")
    p.add_argument("--slices", type=int, default=72)
    p.add_argument(
        "--slice-spacing",
        type=float,
        default=None,
        help="mm between slices around mid-thigh (default: spread over the whole thigh)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("train", help="train a model on phantoms and randomised synthetic thighs")
    _add_model(p)
    p.add_argument(
        "--subjects",
        type=int,
        default=TRAIN_DEFAULTS.subjects,
        help="fixed-phantom training subjects (default: %(default)s)",
    )
    p.add_argument(
        "--slices",
        type=int,
        default=TRAIN_DEFAULTS.slices_per_subject,
        help="slices per fixed-phantom subject (default: %(default)s)",
    )
    p.add_argument(
        "--randomised-subjects",
        type=int,
        default=TRAIN_DEFAULTS.randomised_subjects,
        help="subjects from the randomised generator (default: %(default)s)",
    )
    p.add_argument(
        "--randomised-slices",
        type=int,
        default=TRAIN_DEFAULTS.randomised_slices,
        help="slices per randomised subject (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=TRAIN_DEFAULTS.steps,
        help="optimiser steps (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS.batch_size)
    p.add_argument("--learning-rate", type=float, default=TRAIN_DEFAULTS.learning_rate)
    p.add_argument("--seed", type=int, default=TRAIN_DEFAULTS.seed)
    p.add_argument(
        "--init",
        default=None,
        help="'scratch', 'shipped' (fine-tune the shipped weights) or a weights file "
        "(default: shipped with --data, else scratch)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a dataset from `thighseg dataset import` instead of phantoms",
    )
    p.add_argument(
        "--fold",
        default="0",
        help="with --data: fold number of splits.json, or 'all' (default: %(default)s)",
    )
    p.add_argument(
        "--validate-every",
        type=int,
        default=0,
        help="steps between validation checks written to <weights>.csv; the best weights are "
        "kept (default: 0, only at the end)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=0,
        help="checks without improvement before stopping early (default: 0, never)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=TRAIN_DEFAULTS.context,
        help="neighbour slices on either side as extra input channels: 1 trains a 2.5D model "
        "(2D --init weights are inflated); served and listened to like any other "
        "(default: what the --init weights take; 2D from scratch)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="weights file (default: the shipped weights; with --data, "
        "DATASET/models/<model>_fold<K>.pt)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export", help="export weights to ONNX / TensorRT in the model repository, check parity"
    )
    _add_model(p)
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights to export as the next version (default: the shipped weights as version 1)",
    )
    p.add_argument(
        "--version",
        type=int,
        default=None,
        help="version folder to write (default: next with --weights, else 1)",
    )
    p.add_argument(
        "--format",
        choices=["onnx", "fp16", "tensorrt", "int8", "tensorrt-int8"],
        default="onnx",
        help="onnx: FP32 for the CPU server; fp16: also FP16 ONNX; "
        "tensorrt: also the FP16 engine (GPU); int8: also INT8 ONNX calibrated on phantom slices, "
        "served on CPU if as accurate and faster (cpu_runtime.json says); "
        "tensorrt-int8: also the INT8 engine (GPU)",
    )
    p.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        help="TensorRT timing cache reused between builds",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="run the embedded Triton server (CPU) on the model repository")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--log-file", type=Path, default=None)
    _add_triton_ports(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("listen", help="run the DICOM C-STORE listener")
    _add_model(p)
    _add_model_version(p)
    p.add_argument(
        "--triton-url",
        type=_triton_address,
        default=TRITON_URL,
        help="Triton HTTP (or gRPC) address",
    )
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument(
        "--triton-wait",
        type=_seconds,
        default=0,
        metavar="SECONDS",
        help="wait this long for the model to become ready before giving up",
    )
    p.add_argument(
        "--ae-title",
        type=_ae_title,
        default=AE_TITLE,
        help="called AE title; associations to others are rejected",
    )
    p.add_argument("--host", default=listener_config.default("host"), help="address to listen on")
    p.add_argument("--port", type=_port, default=DICOM_PORT, help="DICOM port")
    p.add_argument(
        "--spool", type=Path, default=Path("spool"), help="received instances and their index"
    )
    p.add_argument(
        "--out", type=Path, default=Path("results"), help="results, one folder per series"
    )
    p.add_argument(
        "--idle",
        type=_seconds,
        default=listener_config.default("idle_s"),
        help="seconds of quiet after release before a series is complete (and its result "
        "published)",
    )
    p.add_argument(
        "--expiry",
        type=_positive_seconds,
        default=listener_config.default("expiry_s"),
        help="seconds after which a series still receiving is given up and freed",
    )
    p.add_argument(
        "--workers",
        type=_at_least_one,
        default=listener_config.default("workers"),
        help="series processed at once",
    )
    p.add_argument(
        "--ingest-processes",
        type=_at_least_one,
        default=listener_config.default("ingest_processes"),
        help="processes receiving C-STOREs on the listener's socket; more cores, more "
        "instances/s across associations (1: in the listener process)",
    )
    p.add_argument(
        "--tta",
        choices=["none", "flip"],
        default="none",
        help="test-time augmentation: 'flip' averages each slice with its mirror (twice the "
        "inference; recorded in report.json and the SEG's algorithm version) (default: none)",
    )
    p.add_argument(
        "--seg-in-listener",
        action="store_true",
        help="write the SEG in the listener process, not in a SEG process during measurement "
        "(~45 MB less at the peak of a 300-slice 512² study; its measure and emit stages took "
        "3.6 s instead of 2.2 s in the benchmark)",
    )
    p.add_argument(
        "--no-head-start",
        action="store_true",
        help="process a series only once it is complete; by default it is already processed "
        "during the --idle wait after its sender's release, and that result is published once "
        "the series completes with nothing new",
    )
    p.add_argument(
        "--stream-slices",
        type=_whole_number,
        default=listener_config.default("stream_slices"),
        help="slices inferred as they arrive, before their series completes (0: infer each "
        "series when complete)",
    )
    p.add_argument(
        "--network-timeout",
        type=_positive_seconds,
        default=listener_config.default("network_timeout_s"),
        metavar="SECONDS",
        help="drop a peer silent this long mid-PDU or mid-TLS-handshake",
    )
    p.add_argument(
        "--drain",
        type=_seconds,
        default=listener_config.default("drain_s"),
        metavar="SECONDS",
        help="on SIGTERM, let open associations finish this long, then abort them",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=LISTENER_METRICS_PORT,
        help="/metrics, /healthz, /readyz port (0: off)",
    )
    p.add_argument(
        "--allow-aet",
        type=_ae_title,
        action="append",
        default=[],
        metavar="AET",
        help="calling AE title allowed to associate (repeat; default: any)",
    )
    p.add_argument(
        "--tls-cert", type=Path, default=None, help="PEM certificate: accept DICOM over TLS"
    )
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-ca", type=Path, default=None, help="require client certificates signed by this CA"
    )
    p.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="AET@HOST:PORT[/seg,sr,sc] | URL[#seg,sr,sc]",
        help="C-STORE results to this AE, or STOW-RS them to this DICOMweb base URL "
        "(http[s]://host/dicom-web); repeat for several; /seg,sr,sc or #seg,sr,sc chooses which "
        "(default: all three)",
    )
    p.add_argument("--batch-size", type=_at_least_one, default=8)
    p.add_argument(
        "--concurrency", type=_at_least_one, default=4, help="batches in flight per series"
    )
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser(
        "segment",
        help="batch: many DICOM folders / NIfTI files, in this process or through Triton, one CSV "
        "row each",
    )
    _add_model(p)
    _add_model_version(p)
    p.add_argument("inputs", nargs="+", type=Path, help="DICOM folders and/or NIfTI files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--triton-url",
        type=_triton_address,
        default=None,
        help="send slices to this Triton (HTTP or gRPC address); default: predict in this process",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="in-process inference device (ONNX Runtime; gpu needs onnxruntime-gpu) "
        "(default: %(default)s)",
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("dataset", help="import labelled CT and split it by subject")
    dataset = p.add_subparsers(dest="dataset_command", required=True)
    p = dataset.add_parser(
        "import",
        help="nnU-Net raw, NIfTI pairs, DICOM CT + SEG or Slicer .seg.nrrd into a dataset",
    )
    p.add_argument("sources", nargs="+", type=Path, help="source folders")
    p.add_argument(
        "--labels", type=Path, required=True, help="label map (YAML or JSON): group -> labels"
    )
    p.add_argument("--out", type=Path, required=True, help="dataset folder (new or existing)")
    p.add_argument(
        "--format",
        choices=["auto", "nnunet", "nifti", "dicom", "slicer"],
        default="auto",
        help="source layout (default: %(default)s, detected per source)",
    )
    p.add_argument(
        "--subject-regex",
        default=None,
        help="regex on the case id whose first group is the subject id (default: case = subject)",
    )
    p.set_defaults(func=cmd_dataset_import)
    p = dataset.add_parser("split", help="folds by subject (never by slice), optional test set")
    p.add_argument("dataset", type=Path)
    p.add_argument("--folds", type=int, default=5, help="k folds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: %(default)s)")
    p.add_argument(
        "--test", type=int, default=0, help="subjects held out for testing (default: %(default)s)"
    )
    p.add_argument("--split-file", type=Path, default=None, help="use this splits JSON instead")
    p.set_defaults(func=cmd_dataset_split)

    p = sub.add_parser("card", help="rewrite the shipped model cards with evaluation figures")
    p.add_argument(
        "--evaluation",
        type=Path,
        required=True,
        help="evaluation.json written by `thighseg evaluate`",
    )
    p.set_defaults(func=cmd_card)

    p = sub.add_parser(
        "evaluate", help="DSC/sensitivity/specificity/accuracy and volume ICC on phantom cohorts"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=sorted(models.BUILDERS),
        help=f"default: all three on phantoms, {DEFAULT_MODEL} with --data",
    )
    p.add_argument(
        "--cohorts",
        nargs="+",
        default=list(EVALUATION_COHORTS),
        choices=["internal_test", "external", "stress", "validation"],
        help="phantom cohorts; 'stress' comes from a generator never used in training (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--fov",
        type=float,
        default=None,
        help="field of view in mm for every study (default: each generator's own)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="evaluate on a dataset from `thighseg dataset import` (its folds and test set) "
        "instead of phantoms",
    )
    p.add_argument(
        "--weights",
        type=Path,
        nargs="+",
        default=None,
        help="with --data: weights to evaluate, one per fold or one (default: shipped)",
    )
    p.add_argument(
        "--fold",
        default="all",
        help="with --data and one weights file: the fold whose validation subjects to score",
    )
    p.add_argument(
        "--tta",
        choices=["none", "flip"],
        default="none",
        help="test-time augmentation: 'flip' averages each slice with its mirror (default: none)",
    )
    p.add_argument("--studies", type=int, default=10, help="studies per cohort")
    p.add_argument("--slices", type=int, default=24, help="slices per study")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("evaluation"))
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument(
        "--triton-url",
        type=_triton_address,
        default=None,
        help="evaluate through a running Triton (default: ONNX Runtime)",
    )
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "bench", help="perf_analyzer sweeps, baselines, ingest and whole-study figures"
    )
    p.add_argument(
        "--models", nargs="+", default=sorted(models.BUILDERS), choices=sorted(models.BUILDERS)
    )
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--study-slices", type=int, default=300)
    p.add_argument(
        "--tiny", action="store_true", help="a run of a few minutes that proves the benchmark works"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the parts an earlier run with the same settings wrote to OUT/bench.json",
    )
    p.add_argument(
        "--parts",
        nargs="+",
        default=list(BENCH_PARTS),
        choices=BENCH_PARTS,
        help="measure only these parts (with --resume, the others an earlier run wrote are kept)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="serve + listen, push a phantom study, print volumes and DSC")
    _add_model(p)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=60)
    p.add_argument("--work", type=Path, default=None, help="keep outputs here (default: temporary)")
    p.add_argument("--port", type=_port, default=DICOM_PORT, help="DICOM port")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    _add_triton_ports(p)
    p.set_defaults(func=cmd_demo)
    for subparser in _all_subparsers(sub):  # every option has help that says its default
        subparser.formatter_class = _DefaultsHelpFormatter
        for action in subparser._actions:
            if action.help is None and action.option_strings:
                action.help = COMMON_HELP[action.dest]
    return parser


# Help of the options several commands share, where the command gives none of its own.
COMMON_HELP = {
    "model": "model architecture",
    "models": "model architectures",
    "seed": "random seed",
    "slices": "slices per study",
    "size": "matrix size in pixels",
    "out": "output folder",
    "repository": "Triton model repository",
    "protocol": "protocol to reach Triton",
    "batch_size": "slices per batch",
    "learning_rate": "peak learning rate (one-cycle schedule)",
    "log_file": "tritonserver's log file (default: discarded)",
    "study_slices": "slices of the study the C-STORE and whole-study parts send",
}


def _all_subparsers(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Every command's parser, nested ones (dataset import/split) included."""
    found = []
    for parser in sub.choices.values():
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += _all_subparsers(action)
    return found


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C: the servers a command started
    # are stopped on the way out, not left running (serve and listen handle it themselves)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError, TimeoutError) as error:  # one line, no traceback
        print(f"error: {error}{_advice(error)}", file=sys.stderr)
        return 1


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _advice(error: BaseException) -> str:
    """What to do about the file-system mistakes people make with --out and --work."""
    if isinstance(error, FileExistsError | NotADirectoryError):
        return f"; {error.filename or 'that path'} is a file: name a folder (new or existing)"
    if isinstance(error, PermissionError):
        return "; choose a folder you can write to, or fix its permissions"
    return ""


if __name__ == "__main__":
    sys.exit(main())
