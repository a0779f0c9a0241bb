"""Model registry: one name per architecture, the same contract: 2·context+1 channels in (a slice
and its `context` neighbours on either side; 1 for a 2D model), 4 classes out.

Imports torch lazily: the runtime (listener, client, embedded server) never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from thighseg.core.labels import NUM_CLASSES
from thighseg.core.resample import stack_channels, stack_context

if TYPE_CHECKING:
    import torch

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# the version-controlled Triton repository
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def _segformer(channels: int) -> torch.nn.Module:
    """SegFormer with a MiT-b0 encoder (3.7 M parameters)."""
    import segmentation_models_pytorch as smp

    return smp.Segformer(
        encoder_name="mit_b0", encoder_weights=None, in_channels=channels, classes=NUM_CLASSES
    )


def _manet(channels: int) -> torch.nn.Module:
    """MANet (multi-scale attention net) with an EfficientNet-B0 encoder and a slim decoder (7.6 M
    parameters; with ResNet-34 it has 31.8 M, too large to train and ship from 2 CPU cores)."""
    import segmentation_models_pytorch as smp

    return smp.MAnet(
        encoder_name="efficientnet-b0",
        encoder_weights=None,
        in_channels=channels,
        classes=NUM_CLASSES,
        decoder_channels=(128, 64, 32, 16, 16),
    )


def _denseunet(channels: int) -> torch.nn.Module:
    """A faithful dense-block U-Net (thighseg.learning.dense_unet), 0.7 M parameters."""
    from thighseg.learning.dense_unet import DenseUNet

    return DenseUNet(in_channels=channels, classes=NUM_CLASSES)


BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "denseunet": _denseunet,
    "manet": _manet,
    "segformer": _segformer,
}


def triton_name(model: str) -> str:
    return f"thighseg_{model}"


def build(model: str, context: int = 0) -> torch.nn.Module:
    """A freshly initialised network (no pretrained weights: nothing is fetched from a hub)."""
    if model not in BUILDERS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(sorted(BUILDERS))}")
    if context < 0:
        raise ValueError(f"context must be >= 0 neighbour slices, got {context}")
    return BUILDERS[model](stack_channels(context))


def weights_path(model: str) -> Path:
    return WEIGHTS_DIR / f"{model}.pt"


def context_of(network: torch.nn.Module) -> int:
    """Neighbour slices on either side the network takes (from its first convolution)."""
    import torch

    stem = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    return stack_context(stem.in_channels)


def inflated(state: Mapping[str, torch.Tensor], network: torch.nn.Module) -> dict:
    """2D weights for a 2.5D `network`: each input convolution's kernel goes to the centre channel
    and the neighbour channels start at zero, so the network begins as exactly the 2D model."""
    import torch

    state = dict(state)
    for name, tensor in network.state_dict().items():
        given = state.get(name)
        if given is not None and given.shape != tensor.shape and given.shape[1] == 1:
            centre = torch.zeros_like(tensor)
            centre[:, tensor.shape[1] // 2] = given[:, 0]
            state[name] = centre
    return state


def load_trained(
    model: str, path: Path | None = None, context: int | None = None
) -> torch.nn.Module:
    """The shipped (or given) weights in eval mode; with `context`, as a network taking that
    many neighbours (2D weights are inflated, for fine-tuning them as 2.5D)."""
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
    trained_context = int(checkpoint.get("context", 0))
    if context is not None and context != trained_context and trained_context:
        raise ValueError(
            f"{path} takes {trained_context} neighbour slice(s) on either side; only 2D weights "
            f"can start a model with context {context}"
        )
    network = build(model, trained_context if context is None else context)
    state = {k: v.float() for k, v in state.items()}
    try:
        network.load_state_dict(inflated(state, network) if context else state)
    except RuntimeError:  # missing / unexpected / mis-shaped layers
        raise ValueError(
            f"{path} holds {trained} weights, not {model}: give --model {trained}"
            if trained != model
            else f"{path} does not fit the {model} network (another architecture's weights?)"
        ) from None
    return network.eval()
