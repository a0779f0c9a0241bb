"""report.json has a published schema and a typed reader: what the pipeline writes, consumers
read."""

import json

import pytest
from jsonschema import Draft202012Validator

from thighseg.measure.qc import Flag
from thighseg.pipeline.report import SCHEMA_VERSION, Forwarding, SeriesReport, schema


@pytest.fixture(scope="module")
def validator():
    return Draft202012Validator(schema())


def test_a_failed_report_validates_and_round_trips(validator, tmp_path):
    report = SeriesReport(
        model="segformer",
        reason="series has 2 instances; at least 3 are needed",
        instances=2,
        study_instance_uid="1.2.3.4.5",
        series_instance_uid="1.2.3.4.6",
        forwarded=[Forwarding("PACS", False, 2, "gave up"), Forwarding("ARCHIVE", True, 1, "")],
    )
    report.write(tmp_path / "report.json")
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["schema_version"] == SCHEMA_VERSION
    assert not list(validator.iter_errors(document))
    assert SeriesReport.read(tmp_path / "report.json") == report


def test_a_schema_1_0_report_with_one_destination_still_reads():
    old = {
        "model": "m",
        "forwarded": {"destination": "PACS", "delivered": True, "attempts": 1, "detail": ""},
    }
    assert SeriesReport.from_json(old).forwarded == [Forwarding("PACS", True, 1, "")]


def test_the_schema_rejects_what_consumers_could_not_read(validator):
    failed_without_reason = SeriesReport(model="segformer").to_json()
    assert list(validator.iter_errors(failed_without_reason))
    done_without_indices = SeriesReport(
        model="segformer", status="done", qc_flags=[Flag("SLICE_JUMP", "x")], outputs=["seg.dcm"]
    ).to_json()
    assert list(validator.iter_errors(done_without_indices))
    unknown_key = {**SeriesReport(model="m", reason="r").to_json(), "volume": 3}
    assert list(validator.iter_errors(unknown_key))
    long_code = {
        **SeriesReport(model="m", reason="r").to_json(),
        "qc_flags": [{"code": "X" * 17, "reason": "r"}],
    }
    assert list(validator.iter_errors(long_code))
