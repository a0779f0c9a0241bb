import socket

import numpy as np
import pytest
from scipy import ndimage

from thighseg.core.labels import normalise_hu
from thighseg.core.ports import EPHEMERAL_RANGE, free_port
from thighseg.core.resample import (
    MODEL_INPUT_SIZE,
    MODEL_PIXEL_MM,
    TileWindow,
    body_window,
    labels_on_tiles,
    tile_logits_to_labels,
    tiles_of,
    to_tile,
)
from thighseg.measure.metrics import dice, dice_per_group, group_volumes_ml
from thighseg.synthetic import phantom


def test_dice_matches_hand_count():
    truth = np.zeros((1, 4, 4), np.uint8)
    prediction = np.zeros_like(truth)
    truth[0, :2, :2] = 1  # 4 voxels
    prediction[0, :2, :3] = 1  # 6 voxels, 4 shared
    assert dice(prediction, truth, 1) == 2 * 4 / 10
    assert dice(prediction, truth, 2) == 1.0  # both empty
    assert dice_per_group(truth, truth) == {"extensor": 1.0, "flexor": 1.0, "adductor": 1.0}


def test_volumes_in_millilitres():
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[:, :5, :] = 1
    labels[:, 5:, :2] = 3
    volumes = group_volumes_ml(labels, (5.0, 0.5, 0.5))  # voxel = 1.25 mm³
    assert volumes["extensor"] == 100 * 1.25 / 1000
    assert volumes["adductor"] == 20 * 1.25 / 1000
    assert volumes["total_muscle"] == volumes["extensor"] + volumes["adductor"]


def test_normalisation_window():
    out = normalise_hu(np.array([-1000.0, -250.0, 0.0, 250.0, 1500.0]))
    assert out.dtype == np.float32
    assert np.allclose(out, [-1, -1, 0, 1, 1])


def test_tile_round_trip_keeps_labels():
    study = phantom.generate(1005, size=512, slices=2)
    tiles, windows = tiles_of(study.hu, (study.geometry.pixel_spacing,) * 2)
    on_tiles = labels_on_tiles(study.labels, windows)
    assert tiles.shape == on_tiles.shape == (2, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE)
    assert set(np.unique(on_tiles)) == {0, 1, 2, 3}
    for k, window in enumerate(windows):
        logits = np.stack([(on_tiles[k] == c).astype(np.float32) for c in range(4)])
        back = tile_logits_to_labels(logits, window, study.labels.shape[1:])
        assert (back == study.labels[k]).mean() > 0.995


def test_the_tile_shows_the_same_thigh_whatever_the_field_of_view():
    tiles = []
    for fov in (450.0, 600.0):
        study = phantom.generate(7, size=512, slices=1, field_of_view=fov)
        pixel = (study.geometry.pixel_spacing,) * 2
        tiles.append(to_tile(study.hu[0], body_window(study.hu[0], pixel)) > -500)
    overlap = (tiles[0] & tiles[1]).sum() / (tiles[0] | tiles[1]).sum()
    assert overlap > 0.97  # on the FOV-scaled grid the body covered 0.56 of the other's area


def test_a_body_wider_than_the_tile_is_shrunk_to_fit_not_cut():
    hu = np.full((512, 512), -1000.0, np.float32)
    hu[200:300, 6:506] = 40.0  # 500 px of 1 mm: wider than the 397 mm tile
    window = body_window(hu, (1.0, 1.0))
    side = window.step[1] * MODEL_INPUT_SIZE
    assert side >= 500 and window.origin[1] <= 6 and window.origin[1] + side >= 506
    assert (to_tile(hu, window) > -500).any(axis=0).sum() < MODEL_INPUT_SIZE  # air both sides
    small = np.full((512, 512), -1000.0, np.float32)
    small[240:272, 100:132] = 40.0
    assert body_window(small, (0.5, 0.5)).step == (MODEL_PIXEL_MM / 0.5,) * 2


def test_an_empty_slice_is_framed_on_its_centre_and_nothing_outside_the_tile_is_labelled():
    hu = np.full((512, 512), -1000.0, np.float32)
    window = body_window(hu, (2.0, 2.0))  # the tile covers 198 of 512 pixels
    centre = [o + s * MODEL_INPUT_SIZE / 2 for o, s in zip(window.origin, window.step, strict=True)]
    assert centre == [256.0, 256.0]
    logits = np.zeros((4, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.float32)
    logits[1] = 5.0  # extensor everywhere on the tile
    labels = tile_logits_to_labels(logits, window, (512, 512))
    inside = MODEL_INPUT_SIZE * MODEL_PIXEL_MM / 2.0 / 2  # tile half side, acquired pixels
    assert labels[256, 256] == 1 and labels[0, 0] == 0
    assert abs((labels[256] == 1).sum() - 2 * inside) <= 2


def _interpolated_everywhere(logits: np.ndarray, window, shape: tuple[int, int]) -> np.ndarray:
    """The reference: every channel interpolated over the whole matrix, then argmax."""
    size = logits.shape[1]
    inverse = [1 / s for s in window.step]
    offset = [(0.5 - o) / s - 0.5 for o, s in zip(window.origin, window.step, strict=True)]
    upsampled = np.stack(
        [
            ndimage.affine_transform(
                channel, inverse, offset=offset, output_shape=shape, order=1, mode="nearest"
            )
            for channel in logits.astype(np.float64)
        ]
    )
    labels = np.argmax(upsampled, axis=0).astype(np.uint8)
    r = (np.arange(shape[0]) + 0.5 - window.origin[0]) / window.step[0]
    c = (np.arange(shape[1]) + 0.5 - window.origin[1]) / window.step[1]
    labels[~((r >= 0) & (r <= size))] = 0
    labels[:, ~((c >= 0) & (c <= size))] = 0
    return labels


@pytest.mark.parametrize(
    "window",
    [
        TileWindow((27.0, 20.0), (1.836, 1.836)),  # a tile inside the slice, upsampled
        TileWindow((-90.3, 140.7), (2.61, 1.3)),  # cut by the slice's edges, anisotropic
        TileWindow((10.2, -5.5), (0.71, 0.71)),  # a small slice: the tile is downsampled
        TileWindow((600.0, 0.0), (1.0, 1.0)),  # entirely outside the slice
    ],
)
def test_only_disputed_pixels_are_interpolated_and_the_labels_are_those_of_full_interpolation(
    window,
):
    rng = np.random.default_rng(3)
    logits = ndimage.gaussian_filter(rng.normal(size=(4, 64, 64)), (0, 2, 2)) * 10
    logits = ndimage.zoom(logits, (1, 4, 4), order=1).astype(np.float32)  # smooth regions, 256²
    expected = _interpolated_everywhere(logits, window, (480, 400))
    labels = tile_logits_to_labels(logits, window, (480, 400))
    assert labels.dtype == np.uint8 and labels.shape == (480, 400)
    assert np.array_equal(labels, expected)
    assert window.origin[0] == 600.0 or len(np.unique(labels)) == 4


def test_free_ports_are_distinct_bindable_and_outside_the_range_clients_draw_from():
    """A port in the ephemeral range can be taken by an outgoing connection before the server
    binds it (CI once failed so); ports below it cannot."""
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    if EPHEMERAL_RANGE.exists():
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
        assert all(port < low for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # bindable when handed out
