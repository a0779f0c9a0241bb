import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODEL, needs_torch

from thighseg.core.labels import normalise_hu
from thighseg.core.resample import MODEL_INPUT_SIZE, tiles_of
from thighseg.learning import models
from thighseg.synthetic import phantom


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    needs_torch()
    from thighseg.export.onnx_export import export_onnx

    network = models.load_trained(MODEL)
    return network, export_onnx(network, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_onnx_has_dynamic_batch_and_opset(exported):
    _, path = exported
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = np.zeros((batch, 1, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.float32)
        assert session.run(["logits"], {"image": x})[0].shape == (
            batch,
            4,
            MODEL_INPUT_SIZE,
            MODEL_INPUT_SIZE,
        )


def test_onnx_runtime_matches_torch_on_phantom_slices(exported):
    from thighseg.export.onnx_export import measure_parity

    network, path = exported
    study = phantom.generate(31, size=384, slices=6)
    tiles, _ = tiles_of(study.hu, (study.geometry.pixel_spacing,) * 2)
    parity = measure_parity(network, path, normalise_hu(tiles)[:, None])
    assert parity.slices == 6 and parity.dice_reference is None
    assert parity.max_abs_logit_diff < 1e-2
    assert parity.argmax_agreement >= 0.9999


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet9000")


def test_fp16_onnx_keeps_the_labels_and_fp32_interface(exported, tmp_path):
    from thighseg.export.build import VALIDATION_SEEDS
    from thighseg.export.fp16 import convert_to_fp16
    from thighseg.export.validation import compare, onnx_backend, phantom_tiles

    _, fp32 = exported
    fp16 = convert_to_fp16(fp32, tmp_path / "model_fp16.onnx")
    session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    images, truth = phantom_tiles(VALIDATION_SEEDS, slices_per_subject=4, size=256)
    comparison = compare(onnx_backend(fp32), onnx_backend(fp16), images, truth)
    assert comparison.argmax_agreement >= 0.995
    assert comparison.max_dice_drop <= 0.005


def test_int8_holds_accuracy_and_its_choice_follows_the_rule(exported, tmp_path):
    import json
    import shutil

    from thighseg.export.build import VALIDATION_SEEDS
    from thighseg.export.int8 import MAX_DICE_DROP, MIN_AGREEMENT, choose_cpu_model, quantise
    from thighseg.export.validation import phantom_tiles

    _, fp32 = exported
    model = shutil.copy(fp32, tmp_path / "model.onnx")
    images, truth = phantom_tiles(VALIDATION_SEEDS, slices_per_subject=4, size=256)
    paths = quantise(model, images[::2])  # calibrated on other slices than it is judged on
    for name in ("cpu", "tensorrt"):
        graph = onnx.load(str(paths[name])).graph
        assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
    symmetric = onnx.load(str(paths["tensorrt"])).graph
    zero_points = [
        t for t in symmetric.initializer if t.name.endswith("zero_point") and t.data_type == 3
    ]  # INT8: what TensorRT's explicit quantisation takes
    assert zero_points and all(not onnx.numpy_helper.to_array(t).any() for t in zero_points)
    assert len(paths["calibration"].read_text().splitlines()) > 10
    record = choose_cpu_model(model, paths["cpu"], images[1::2], truth[1::2], threads=2)
    assert record["int8_vs_fp32"]["argmax_agreement"] >= MIN_AGREEMENT
    assert record["int8_vs_fp32"]["max_dice_drop"] <= MAX_DICE_DROP
    faster = record["slices_per_s_batch1"]["int8"] > record["slices_per_s_batch1"]["fp32"]
    assert record["onnx"] == ("model_int8.onnx" if faster else "model.onnx")
    assert json.loads((tmp_path / "cpu_runtime.json").read_text()) == record


def test_a_2p5d_model_exports_with_its_channels_and_never_joins_2d_versions(tmp_path):
    needs_torch()
    import shutil

    import torch

    from thighseg.export.onnx_export import export_to_repository
    from thighseg.export.validation import onnx_backend, onnx_context

    repository = tmp_path / "repository"
    name = models.triton_name(MODEL)
    shutil.copytree(models.REPOSITORY / name, repository / name, ignore=shutil.ignore_patterns("1"))
    network = models.load_trained(MODEL, context=1)
    weights = tmp_path / "2p5d.pt"
    torch.save({"state_dict": network.state_dict(), "context": 1}, weights)
    onnx_path = export_to_repository(MODEL, repository, weights, version=1)
    assert onnx_context(onnx_path) == 1
    assert onnx_backend(onnx_path)(np.zeros((2, 3, 256, 256), np.float32)).shape == (2, 4, 256, 256)
    for config in (repository / name / "config.pbtxt", repository / name / "configs" / "cpu.pbtxt"):
        assert config.read_text().count("dims: [ 3, 256, 256 ]") == 2  # the input and warm-up
    with pytest.raises(ValueError, match="share one input"):
        export_to_repository(MODEL, repository, models.weights_path(MODEL), version=2)
    assert not (repository / name / "2").exists()
