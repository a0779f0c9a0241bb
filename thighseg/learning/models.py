"""Model registry: one name per architecture, the same 1-channel in / 4-class out contract.

Imports torch lazily: the runtime (listener, client, embedded server) never needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from thighseg.core.labels import NUM_CLASSES

if TYPE_CHECKING:
    import torch

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# the version-controlled Triton repository
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def _segformer() -> torch.nn.Module:
    """SegFormer with a MiT-b0 encoder (3.7 M parameters)."""
    import segmentation_models_pytorch as smp

    return smp.Segformer(
        encoder_name="mit_b0", encoder_weights=None, in_channels=1, classes=NUM_CLASSES
    )


def _manet() -> torch.nn.Module:
    """MANet (multi-scale attention net) with an EfficientNet-B0 encoder and a slim decoder (7.6 M
    parameters; with ResNet-34 it has 31.8 M, too large to train and ship from 2 CPU cores)."""
    import segmentation_models_pytorch as smp

    return smp.MAnet(
        encoder_name="efficientnet-b0",
        encoder_weights=None,
        in_channels=1,
        classes=NUM_CLASSES,
        decoder_channels=(128, 64, 32, 16, 16),
    )


def _denseunet() -> torch.nn.Module:
    """A faithful dense-block U-Net (thighseg.learning.dense_unet), 0.7 M parameters."""
    from thighseg.learning.dense_unet import DenseUNet

    return DenseUNet(in_channels=1, classes=NUM_CLASSES)


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "denseunet": _denseunet,
    "manet": _manet,
    "segformer": _segformer,
}


def triton_name(model: str) -> str:
    return f"thighseg_{model}"


def build(model: str) -> torch.nn.Module:
    """A freshly initialised network (no pretrained weights: nothing is fetched from a hub)."""
    if model not in BUILDERS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(sorted(BUILDERS))}")
    return BUILDERS[model]()


def weights_path(model: str) -> Path:
    return WEIGHTS_DIR / f"{model}.pt"


def load_trained(model: str, path: Path | None = None) -> torch.nn.Module:
    """The shipped (or given) weights in eval mode."""
    import torch

    path = path or weights_path(model)
    if not path.exists():
        raise FileNotFoundError(
            f"no weights for {model!r} at {path}; run `thighseg train --model {model}`"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
    except Exception as error:  # noqa: BLE001 - any unreadable file: one message, not a traceback
        raise ValueError(f"{path} is not a thighseg weights file ({error!s:.80})") from None
    trained = checkpoint.get("config", {}).get("model", model)
    network = build(model)
    try:
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError:  # missing / unexpected / mis-shaped layers
        raise ValueError(
            f"{path} holds {trained} weights, not {model}: give --model {trained}"
            if trained != model
            else f"{path} does not fit the {model} network (another architecture's weights?)"
        ) from None
    return network.eval()
