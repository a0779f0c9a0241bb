"""Streaming inference: slices inferred as they arrive give exactly the whole-volume labels, only
for the very content the index names, within a memory budget."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pydicom

from thighseg.client.volume import segment_volume
from thighseg.pipeline import streaming
from thighseg.pipeline.assemble import assemble, slice_hu
from thighseg.pipeline.stages import InferenceSettings, LoadedVolume, infer_stage, streamed_by_index
from thighseg.pipeline.streaming import SliceCache


def digest_of(path) -> str:
    """The content digest the listener's index records (SHA-256 of the stored file)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def intensity_logits(images: np.ndarray) -> np.ndarray:
    """Deterministic stand-in for a model: class by intensity band (no server needed)."""
    x = images[:, 0]
    return np.stack([-np.abs(x - c) for c in (-1.0, -0.1, 0.2, 0.6)], axis=1).astype(np.float32)


def test_streamed_slices_equal_the_whole_volume_path_and_only_the_missing_are_inferred(
    study_factory,
):
    paths = study_factory(91, size=128, slices=6)
    volume = assemble(list(paths))
    whole = segment_volume(volume.hu, intensity_logits, 64, volume.spacing_zyx[1:])
    cache = SliceCache(intensity_logits, 64)
    stored = {str(s.SOPInstanceUID): p for s, p in zip(volume.sources, volume.paths, strict=True)}
    uids = list(stored)
    for uid in uids[:-2]:  # the last two have not arrived yet
        assert cache.submit("series", uid, digest_of(stored[uid]), stored[uid])
    streamed = cache.take("series", {uid: digest_of(stored[uid]) for uid in uids})
    assert set(streamed) == set(uids[:-2])
    calls = []

    def counting(images):
        calls.append(len(images))
        return intensity_logits(images)

    settings = InferenceSettings(counting, "test", 64, batch_size=8, concurrency=1)
    by_index = {uids.index(uid): done for uid, done in streamed.items()}
    labels = infer_stage(volume.hu, volume.spacing_zyx[1:], settings, by_index)
    assert np.array_equal(labels, whole)
    assert sum(calls) == 2  # only the tail
    first = pydicom.dcmread(stored[uids[0]])
    assert np.array_equal(slice_hu(first), volume.hu[0].astype(np.float32))
    assert cache.slices == 0  # taken: forgotten


def test_labels_of_other_content_are_never_used(study_factory):
    paths = study_factory(92, size=128, slices=3)
    cache = SliceCache(intensity_logits, 64)
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID)
    cache.submit("series", uid, digest_of(paths[0]), paths[0])
    assert cache.take("series", {uid: "newer-content"}) == {}
    # a file replaced after it was submitted is not inferred from its new bytes either
    cache.submit("series", uid, "content-when-stored", paths[0])
    assert cache.take("series", {uid: "content-when-stored"}) == {}
    assert cache.slices == 0


def stored(paths) -> tuple[list[str], dict[str, str]]:
    """The instances' SOP Instance UIDs, and their content digests by UID."""
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    return uids, {uid: digest_of(p) for uid, p in zip(uids, paths, strict=True)}


def held_until(gate: threading.Event):
    """The stand-in model, answering only once `gate` is set."""

    def held(images):
        gate.wait(10)
        return intensity_logits(images)

    return held


def test_the_budget_caps_streamed_slices_and_a_failure_is_inferred_later(study_factory):
    paths = study_factory(93, size=128, slices=3)
    uids, digests = stored(paths)
    gate = threading.Event()
    cache = SliceCache(held_until(gate), 64, max_slices=2, workers=1)
    accepted = [cache.submit("s", u, digests[u], p) for u, p in zip(uids, paths, strict=True)]
    assert accepted == [True, True, False]
    gate.set()
    assert len(cache.take("s", digests)) == 2

    def failing(images):
        raise ConnectionError("triton went away")

    broken = SliceCache(failing, 64)
    broken.submit("s", uids[0], digests[uids[0]], paths[0])
    assert broken.take("s", digests) == {}
    assert broken.slices == 0


def test_slices_behind_a_backlog_are_left_to_be_measured_with_the_series(study_factory):
    bound = streaming.MEASURE_BACKLOG_PER_WORKER  # one worker: slices pending, itself included
    paths = study_factory(94, size=64, slices=bound + 4)
    uids, digests = stored(paths)
    gate = threading.Event()
    cache = SliceCache(held_until(gate), 64, workers=1)
    for uid, path in zip(uids, paths, strict=True):
        assert cache.submit("s", uid, digests[uid], path)
    gate.set()
    done = cache.take("s", digests)
    measured = [done[uid].sums is not None for uid in uids]
    assert measured == [False] * 4 + [True] * bound  # in arrival order


def neighbour_logits(images: np.ndarray) -> np.ndarray:
    """A 2.5D stand-in model: class by the intensity band of a slice and its neighbours' mean."""
    return intensity_logits(images.mean(axis=1, keepdims=True))


def test_a_2p5d_slice_streams_once_its_neighbours_arrive_and_only_with_the_volumes_neighbours(
    study_factory,
):
    paths = study_factory(95, size=128, slices=7)
    volume = assemble(list(paths))
    pixel_mm = volume.spacing_zyx[1:]
    whole = segment_volume(volume.hu, neighbour_logits, 64, pixel_mm, context=1)
    assert not np.array_equal(whole, segment_volume(volume.hu, intensity_logits, 64, pixel_mm))
    uids = [str(s.SOPInstanceUID) for s in volume.sources]  # in position order
    digests = {uid: digest_of(p) for uid, p in zip(uids, volume.paths, strict=True)}
    cache = SliceCache(neighbour_logits, 64, context=1)
    for k in (3, 1, 6, 0, 4, 2):  # out of order, and the slice at index 5 not yet
        assert cache.submit("s", uids[k], digests[uids[k]], volume.paths[k])
    early = cache.peek("s", digests)
    assert set(early) == {uids[k] for k in (1, 2, 3, 4)}  # the ends wait for the series
    assert early[uids[4]].neighbours == (uids[3], uids[4], uids[6])  # 5 was not there yet
    # each keeps only its own labels, deflated
    assert all(len(done.deflated) < done.labels.nbytes / 4 for done in early.values())
    loaded = LoadedVolume(volume.hu, volume.spacing_zyx, None, volume)
    assert set(streamed_by_index(loaded, early)) == {1, 2, 3}  # 4 had the wrong neighbour
    cache.submit("s", uids[5], digests[uids[5]], volume.paths[5])
    streamed = streamed_by_index(loaded, cache.take("s", digests))
    assert set(streamed) == {1, 2, 3, 4, 5}  # 4 inferred again with 5 beside it
    calls = []

    def counting(images):
        calls.append(len(images))
        return neighbour_logits(images)

    settings = InferenceSettings(counting, "test", 64, context=1, batch_size=8, concurrency=1)
    labels = infer_stage(volume.hu, pixel_mm, settings, streamed)
    assert np.array_equal(labels, whole)
    assert sum(calls) == 2  # only the two ends
    assert cache.slices == 0


def test_a_stack_inferred_before_a_slice_arrived_between_never_replaces_the_newer_one(
    study_factory,
):
    paths = study_factory(96, size=64, slices=4)
    volume = assemble(list(paths))
    uids = [str(s.SOPInstanceUID) for s in volume.sources]  # in position order
    digests = {uid: digest_of(p) for uid, p in zip(uids, volume.paths, strict=True)}
    first_started, newer_done, calls = threading.Event(), threading.Event(), []

    def older_finishes_last(images):
        calls.append(len(images))
        if len(calls) == 1:  # slice 2 between 0 and 3: held until 1 has arrived and been used
            first_started.set()
            newer_done.wait(10)
            time.sleep(0.3)  # the other worker stores the newer stack meanwhile
        elif len(calls) == 3:
            newer_done.set()
        return neighbour_logits(images)

    cache = SliceCache(older_finishes_last, 64, workers=2, context=1)
    for k in (0, 2, 3):
        cache.submit("s", uids[k], digests[uids[k]], volume.paths[k])
    assert first_started.wait(10)
    cache.submit("s", uids[1], digests[uids[1]], volume.paths[1])
    done = cache.take("s", digests)
    assert len(calls) == 3  # (0, 2, 3), then (0, 1, 2) and (1, 2, 3)
    assert done[uids[2]].neighbours == (uids[1], uids[2], uids[3])
    loaded = LoadedVolume(volume.hu, volume.spacing_zyx, None, volume)
    assert set(streamed_by_index(loaded, done)) == {1, 2}
