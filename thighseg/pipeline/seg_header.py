"""A SEG's header built before its labels exist.

Every frame of thighseg's binary SEG is kept (one per source slice and segment), so everything in
it but its Pixel Data follows from the source headers alone: highdicom builds it from all-zero
labels and pydicom encodes it while the study is still being inferred and measured. Once the
labels are known only their bits remain, packed in the frames' order and appended (~0.1 s of a
300-slice 512² study). The file is the one highdicom writes from those labels (tested, element by
element and bit for bit).

The frames of the blank labels are built STAND_IN pixels square, and the header then given the
sources' Rows and Columns: nothing else in it depends on the frame size, and highdicom's 512²
frames of zeros cost ~120 MB (the frames, then joined) and ~0.5 s of packing for bits that are
thrown away.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from thighseg.pipeline.seg_inputs import PIXEL_DATA

FRAMES_AT_ONCE = 8  # packed together: 2 MB of masks at 512²
STAND_IN = 8  # rows and columns of the blank frames (a whole number of bytes: 1-bit pixels)


@dataclass(frozen=True)
class SegHeader:
    """A SEG encoded up to its Pixel Data, and each frame's (source index, segment number)."""

    sop_instance_uid: str
    encoded: bytes  # preamble, file meta and every element before the Pixel Data
    pixel_vr: str
    frames: np.ndarray  # (frames, 2)
    rows: int
    columns: int

    @classmethod
    def of(
        cls,
        sources: list[Dataset],
        model: str,
        algorithm_version: str | None,
        series_instance_uid: str,
        sop_instance_uid: str,
    ) -> SegHeader:
        """The header of the SEG `build_seg` makes of these sources, whatever its labels (built
        in the SEG process: the listener that loads and fills it in never imports highdicom)."""
        from thighseg.pipeline.outputs import build_seg

        rows, columns = int(sources[0].Rows), int(sources[0].Columns)
        seg = build_seg(
            [_at_stand_in_size(source) for source in sources],
            np.zeros((len(sources), STAND_IN, STAND_IN), np.uint8),
            model,
            algorithm_version,
            series_instance_uid,
            sop_instance_uid,
        )
        seg.Rows, seg.Columns = rows, columns
        if seg.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
            raise ValueError(f"transfer syntax {seg.file_meta.TransferSyntaxUID}")
        index = {str(source.SOPInstanceUID): k for k, source in enumerate(sources)}
        frames = np.array(
            [
                (
                    index[
                        item.DerivationImageSequence[0]
                        .SourceImageSequence[0]
                        .ReferencedSOPInstanceUID
                    ],
                    item.SegmentIdentificationSequence[0].ReferencedSegmentNumber,
                )
                for item in seg.PerFrameFunctionalGroupsSequence
            ],
            dtype=np.int32,
        ).reshape(-1, 2)
        pixel_vr = correct_ambiguous_vr_element(seg[PIXEL_DATA], seg, True).VR  # OB or OW
        del seg[PIXEL_DATA]
        if any(tag > PIXEL_DATA for tag in seg.keys()):
            raise ValueError("elements after the Pixel Data")
        buffer = io.BytesIO()
        seg.save_as(buffer)
        return cls(sop_instance_uid, buffer.getvalue(), pixel_vr, frames, rows, columns)

    def save(self, path: Path) -> None:
        """Written whole or not at all (a SEG process killed meanwhile leaves no half header)."""
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as file:
            np.savez(
                file,
                sop_instance_uid=np.array(self.sop_instance_uid),
                encoded=np.frombuffer(self.encoded, np.uint8),
                pixel_vr=np.array(self.pixel_vr),
                frames=self.frames,
                size=np.array([self.rows, self.columns]),
            )
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> SegHeader:
        """A header `save` wrote (in the SEG process), read where the frames are filled in."""
        with np.load(path) as saved:
            rows, columns = (int(n) for n in saved["size"])
            return cls(
                str(saved["sop_instance_uid"]),
                saved["encoded"].tobytes(),
                str(saved["pixel_vr"]),
                saved["frames"],
                rows,
                columns,
            )

    def _check(self, sided: np.ndarray) -> None:
        """Refuses labels (z, y, x) whose slices are not this header's frames'."""
        slices, rows, columns = sided.shape
        if (rows, columns) != (self.rows, self.columns):
            raise ValueError(f"{rows}x{columns} labels for {self.rows}x{self.columns} frames")
        if (rows * columns) % 8:
            raise ValueError(f"{rows}x{columns} frames do not end on a byte")
        segments = np.unique(self.frames[:, 1])
        covered = np.zeros((slices, int(segments.max()) + 1), bool)
        if len(self.frames) == slices * len(segments) and self.frames[:, 0].max() < slices:
            covered[self.frames[:, 0], self.frames[:, 1]] = True
        if not covered[:, segments].all():  # every slice has a frame of every segment
            raise ValueError(f"{len(self.frames)} frames for {slices} slices")

    def write(self, sided: np.ndarray, path: Path) -> None:
        """The SEG of segment numbers `sided` (one slice per source), to `path`: the frames
        packed as highdicom packs them, a few at a time (no SEG-sized buffer)."""
        self._check(sided)
        frame_bytes = sided.shape[1] * sided.shape[2] // 8
        length = len(self.frames) * frame_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            file.write(self.encoded)
            writer = DicomFileLike(file)
            writer.is_little_endian, writer.is_implicit_VR = True, False
            # the element's header as pydicom writes it (PS3.5 7.1.2: OB/OW have a 32-bit length)
            writer.write_tag(Tag(PIXEL_DATA))
            writer.write(self.pixel_vr.encode())
            writer.write_US(0)
            writer.write_UL(length + length % 2)
            buffer = np.empty((FRAMES_AT_ONCE, *sided.shape[1:]), bool)  # reused: no copies
            for start in range(0, len(self.frames), FRAMES_AT_ONCE):
                frames = self.frames[start : start + FRAMES_AT_ONCE]
                masks = buffer[: len(frames)]
                for mask, (source, segment) in zip(masks, frames, strict=True):
                    np.equal(sided[source], sided.dtype.type(segment), out=mask)
                file.write(np.packbits(masks.reshape(len(frames), -1), axis=-1, bitorder="little"))
            if length % 2:
                file.write(b"\0")  # values have even lengths


def _at_stand_in_size(source: Dataset) -> Dataset:
    """The header as if its image were STAND_IN pixels square (its elements shared, unchanged)."""
    stand_in = Dataset()
    for tag in source.keys():
        stand_in.add(source[tag])
    for keyword in ("Rows", "Columns"):  # new elements: setting the value would change the source's
        stand_in.add_new(keyword, "US", STAND_IN)
    return stand_in
