import numpy as np

from thighseg.core.labels import normalise_hu
from thighseg.core.resample import logits_to_labels, to_model_grid
from thighseg.measure.metrics import dice, dice_per_group, group_volumes_ml


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


def test_resampling_round_trip_keeps_labels():
    labels = np.zeros((3, 512, 512), np.uint8)
    labels[:, 100:300, 50:250] = 2
    logits = np.stack([labels == k for k in range(4)], axis=1).astype(np.float32)
    small = to_model_grid(logits.reshape(12, 512, 512), 256).reshape(3, 4, 256, 256)
    back = logits_to_labels(small, (512, 512))
    assert back.shape == labels.shape
    assert (back == labels).mean() > 0.995
