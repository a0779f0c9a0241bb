"""The series report: one typed record of what was processed and measured, written as report.json.

Every consumer (batch table, benchmark, demo, forwarding) reads it through `SeriesReport`, and
the file's shape is published as a JSON Schema (`report.schema.json` beside this module) that each
report the tests write is validated against. `schema_version` changes when the shape does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import thighseg
from thighseg.measure.indices import VolumeIndices
from thighseg.measure.qc import Flag

SCHEMA_VERSION = "1.2"  # 1.1: forwarded is a list (one entry per destination); 1.2: tta
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
DONE, FAILED = "done", "failed"


@dataclass(frozen=True)
class Forwarding:
    """Delivery of the results to a destination (`listen --forward`): its AE title or URL."""

    destination: str
    delivered: bool
    attempts: int
    detail: str


@dataclass
class SeriesReport:
    """Filled stage by stage; `status` is failed until the last stage has run."""

    model: str
    model_version: str | None = None  # the Triton model version that answered
    weights_sha256: str | None = None  # of the weights that version was exported from
    tta: str = "none"  # test-time augmentation: "flip" averages each slice with its mirror
    status: str = FAILED
    reason: str | None = None
    instances: int = 0
    # an expired transfer: what had arrived before it was freed
    instances_received: int | None = None
    source: str | None = None  # the NIfTI file, for inputs that are not DICOM series
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    # over each SOP Instance UID and its file's SHA-256 (listener)
    content_sha256: str | None = None
    generation: int | None = None  # the spool index's generation of the series that was processed
    shape_zyx: list[int] | None = None
    spacing_zyx_mm: list[float] | None = None
    volumes_ml: dict[str, float] | None = None
    indices: VolumeIndices | None = None
    qc_flags: list[Flag] = field(default_factory=list)
    seg_sop_instance_uid: str | None = None
    sr_sop_instance_uid: str | None = None
    sc_sop_instance_uid: str | None = None
    outputs: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    forwarded: list[Forwarding] = field(default_factory=list)  # one entry per destination
    thighseg_version: str = thighseg.__version__

    @property
    def done(self) -> bool:
        """Did every stage run?"""
        return self.status == DONE

    def to_json(self) -> dict:
        """The report.json document: unset fields are left out, indices and flags as plain data."""
        document = {"schema_version": SCHEMA_VERSION}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None:
                continue
            if isinstance(value, VolumeIndices):
                value = value.to_dict()
            elif item.name == "qc_flags":
                value = [flag.as_dict() for flag in value]
            elif item.name == "forwarded":
                value = [asdict(record) for record in value]
            document[item.name] = value
        return document

    @classmethod
    def from_json(cls, document: dict) -> SeriesReport:
        """The report from report.json's document (unknown keys are ignored)."""
        known = {item.name for item in fields(cls)}
        values = {k: v for k, v in document.items() if k in known}
        if values.get("indices") is not None:
            values["indices"] = VolumeIndices.from_dict(values["indices"])
        values["qc_flags"] = [Flag(**flag) for flag in values.get("qc_flags", [])]
        forwarded = values.get("forwarded") or []
        if isinstance(forwarded, dict):  # schema 1.0: one destination
            forwarded = [forwarded]
        values["forwarded"] = [Forwarding(**f) for f in forwarded]
        return cls(**values)

    def write(self, path: Path) -> None:
        """Atomically: a reader sees the old report or the new one, never half of one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".part")
        temporary.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        temporary.replace(path)

    @classmethod
    def read(cls, path: Path) -> SeriesReport:
        """The report in a report.json file."""
        return cls.from_json(json.loads(path.read_text()))


def schema() -> dict:
    """The published JSON Schema of report.json."""
    return json.loads(SCHEMA_PATH.read_text())
