"""Every model configuration parses with Triton's own protobuf, respects the engine profile and
declares the input its shipped weights take."""

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from thighseg.core.resample import MODEL_INPUT_SIZE
from thighseg.export.tensorrt_engine import PROFILE_MAX, PROFILE_MIN

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
MODEL_DIRS = sorted(p for p in REPOSITORY.iterdir() if p.is_dir())


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def shipped_channels(model_dir: Path) -> int:
    """Input channels of the shipped weights (2·context+1), from their training record."""
    record = (
        REPOSITORY.parent / "thighseg" / "weights" / f"{model_dir.name[len('thighseg_') :]}.json"
    )
    return 2 * (json.loads(record.read_text())["config"].get("context") or 0) + 1


def io_signature(config) -> list:
    return [(t.name, t.data_type, list(t.dims)) for t in (*config.input, *config.output)]


def test_repository_has_models():
    assert [p.name for p in MODEL_DIRS] and all(p.name.startswith("thighseg_") for p in MODEL_DIRS)


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda p: p.name)
def test_production_config_stays_inside_the_tensorrt_profile(model_dir):
    config = parse(model_dir / "config.pbtxt")
    assert config.name == model_dir.name
    assert config.platform == "tensorrt_plan"
    assert PROFILE_MIN <= config.max_batch_size <= PROFILE_MAX
    assert config.dynamic_batching.preferred_batch_size
    assert all(
        PROFILE_MIN <= b <= config.max_batch_size
        for b in config.dynamic_batching.preferred_batch_size
    )
    assert config.dynamic_batching.max_queue_delay_microseconds <= 5000
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    image = [shipped_channels(model_dir), MODEL_INPUT_SIZE, MODEL_INPUT_SIZE]
    assert io_signature(config) == [
        ("image", model_config_pb2.TYPE_FP32, image),
        ("logits", model_config_pb2.TYPE_FP32, [4, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE]),
    ]
    for warmup in config.model_warmup:
        assert warmup.batch_size <= config.max_batch_size
        assert list(warmup.inputs["image"].dims) == image


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda p: p.name)
def test_cpu_variant_matches_the_production_contract(model_dir):
    production, cpu = parse(model_dir / "config.pbtxt"), parse(model_dir / "configs" / "cpu.pbtxt")
    assert cpu.name == production.name
    assert cpu.backend == "python" and (model_dir / "1" / "model.py").exists()
    assert cpu.max_batch_size >= 16 and cpu.HasField("dynamic_batching")
    # read by model.py; 0: whole batches
    assert int(cpu.parameters["inference_batch"].string_value) >= 0
    assert io_signature(cpu) == io_signature(production)
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]


def test_a_broken_config_is_rejected_by_the_parser(tmp_path):
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "x"\nmax_batch_size: "sixteen"\n')
    with pytest.raises(text_format.ParseError):
        parse(bad)
