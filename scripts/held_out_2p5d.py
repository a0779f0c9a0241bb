"""Score 2D and 2.5D weights on the same held-out slices of the training generators.

The held-out sets are those `thighseg train` checks (phantom validation subjects 1036-1039 and
randomised subjects 190000-190003), built with neighbours; a 2D model sees only the centre
channel, so both models are judged on exactly the same slices. The stress cohort is not used:
deciding between models is tuning.

    .venv/bin/python scripts/held_out_2p5d.py thighseg/weights/denseunet.pt /tmp/d25/denseunet.pt \
        --out docs/evaluation/2p5d_denseunet_held_out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from thighseg.learning import models
from thighseg.learning.training import (
    HELD_OUT_LEVELS,
    TrainConfig,
    _dice_on,
    held_out_seeds,
    randomised_slices,
    synthetic_held_out,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, nargs="+", help="weights files to score")
    parser.add_argument("--model", default="denseunet")
    parser.add_argument("--context", type=int, default=1, help="neighbours a side in the sets")
    parser.add_argument(
        "--randomised-seeds",
        type=int,
        nargs=2,
        metavar=("FIRST", "LAST"),
        help="score these randomised subjects (8 levels each) instead of training's held-out sets",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.randomised_seeds:
        first, last = args.randomised_seeds
        seeds = {"randomised": list(range(first, last + 1))}
        held_out = {
            "randomised": randomised_slices(
                seeds["randomised"], HELD_OUT_LEVELS, context=args.context
            )
        }
    else:
        config = TrainConfig(context=args.context)
        held_out = synthetic_held_out(config)
        seeds = held_out_seeds(config)
    figures = {}
    for weights in args.weights:
        network = models.load_trained(args.model, weights)
        used = models.context_of(network)
        centre = slice(args.context - used, args.context + used + 1)
        scored = {}
        for name, (images, truth) in held_out.items():
            scored[name] = _with_mean(_dice_on(network, images[:, centre], truth))
            per_subject = np.split(np.arange(len(images)), len(seeds[name]))
            scored[f"{name}_by_subject"] = {
                str(seed): _with_mean(_dice_on(network, images[rows][:, centre], truth[rows]))
                for seed, rows in zip(seeds[name], per_subject, strict=True)
            }
        sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
        figures[str(weights)] = {"sha256": sha256, "context": used, **scored}
        print(weights, json.dumps(scored, indent=1))
    report = {
        "dsc": "per group over all slices of a set (or a subject) pooled, then the mean of groups",
        "seeds": seeds,
        "slices": _counts(held_out),
        "models": figures,
    }
    args.out.write_text(json.dumps(report, indent=2))


def _with_mean(dsc: dict[str, float]) -> dict[str, float]:
    return {**dsc, "mean": float(np.mean(list(dsc.values())))}


def _counts(held_out: dict) -> dict[str, int]:
    return {name: len(images) for name, (images, _) in held_out.items()}


if __name__ == "__main__":
    main()
