"""A 2.5D model (each slice with its neighbours as channels) served by the real Triton server and
fed by the real listener: streamed or not, the labels are those of the model run locally on the
assembled volume, so the neighbours reach the model in the volume's order."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODEL, exported_repository, needs_torch, running_triton

from thighseg.client.volume import segment_volume
from thighseg.dicom_listener.scu import send_files
from thighseg.learning import models
from thighseg.pipeline.assemble import assemble
from thighseg.pipeline.loaders import labels_from_seg

NEIGHBOUR_WEIGHT = 0.4  # of the centre's kernel, so that the neighbours change the labels


@pytest.fixture(scope="module")
def repository_2p5d(tmp_path_factory):
    """The shipped weights inflated to 2.5D, the neighbour channels made to matter, exported."""
    needs_torch()
    import torch

    network = models.load_trained(MODEL, context=1)
    stem = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        stem.weight[:, 0] = NEIGHBOUR_WEIGHT * stem.weight[:, 1]  # the slice before
        stem.weight[:, 2] = -NEIGHBOUR_WEIGHT * stem.weight[:, 1]  # the slice after
    weights = tmp_path_factory.mktemp("weights_2p5d") / f"{MODEL}_2p5d.pt"
    torch.save({"state_dict": network.state_dict(), "context": 1}, weights)
    return exported_repository(tmp_path_factory.mktemp("repository_2p5d"), weights)


@pytest.fixture(scope="module")
def triton_2p5d(repository_2p5d, tmp_path_factory):
    with running_triton(repository_2p5d, tmp_path_factory.mktemp("triton_2p5d")) as server:
        yield server


def test_a_served_2p5d_model_gets_each_slice_with_its_neighbours_streamed_or_not(
    triton_2p5d, repository_2p5d, listener_factory, study_factory
):
    from thighseg.export.validation import onnx_backend

    paths = study_factory(4646)
    volume = assemble(list(paths))
    onnx_path = repository_2p5d / models.triton_name(MODEL) / "1" / "model.onnx"
    model = onnx_backend(onnx_path)
    local = segment_volume(volume.hu, model, 256, volume.spacing_zyx[1:], context=1)
    # the neighbours in the other order give other labels: the order is tested, not only the count
    upside_down = segment_volume(volume.hu[::-1], model, 256, volume.spacing_zyx[1:], context=1)
    assert (upside_down[::-1] != local).mean() > 0.001
    uids = [s.SOPInstanceUID for s in volume.sources]
    streaming = listener_factory(triton_url=triton_2p5d.http_url)
    whole = listener_factory(triton_url=triton_2p5d.http_url, stream_slices=0)
    assert streaming.inference.context == 1
    labels = []
    for receiver in (streaming, whole):
        assert send_files(list(reversed(paths)), "127.0.0.1", receiver.config.port) == [0] * len(
            paths
        )
        result = receiver.wait_for(str(volume.sources[0].SeriesInstanceUID), timeout_s=300)
        assert result.report.status == "done", result.report
        labels.append(labels_from_seg(result.seg_path, uids))
    assert np.array_equal(labels[0], labels[1])
    assert (labels[0] == local).mean() > 0.999
    streamed = streaming.telemetry.registry.get_sample_value("thighseg_slices_streamed_total")
    assert streamed == len(paths)
