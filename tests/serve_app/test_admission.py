"""Admission to a replica's batch queue and the fair decode queue, without Ray: the bounds the
configuration promises (faces, wait, turns), asserted as counts and orders, not as timings."""

from __future__ import annotations

import asyncio
import time

import hostile
import pytest

from engines import source_faces
from serve_app.admission import Admission
from serve_app.codec import FaceJob, Limits, RequestError, image_job
from serve_app.decode_queue import FairDecodeQueue


def test_admission_bounds_pending_faces():
    admission = Admission(max_pending_faces=100, max_wait_s=10.0)
    first = admission.admit(60)
    with pytest.raises(RequestError) as info:
        admission.admit(41)
    assert (info.value.status, info.value.reason) == (503, "overloaded")
    assert "max_pending_faces (100)" in info.value.message
    admission.release(first)
    admission.release(admission.admit(100))
    assert admission.pending_faces == 0


def test_admission_refuses_at_once_what_could_not_start_within_max_wait():
    admission = Admission(max_pending_faces=10_000, max_wait_s=0.5)
    admission.check_open()  # nothing measured yet: open
    admission.finish_batch(faces=4, encode_s=1.0)  # a small batch at low load: 4 faces/s
    admission.finish_batch(faces=32, encode_s=1.0)  # a full one: 32 faces/s, the estimate
    assert admission.faces_per_s == 32
    tickets = [admission.admit(8), admission.admit(8)]  # 16 faces ahead of the next: 0.5 s
    admission.check_open()  # 0.5 s is not more than 0.5 s
    tickets.append(admission.admit(1))
    with pytest.raises(RequestError, match=r"wait about 0.53 s .* max_queue_wait_s \(0.5 s\)") as info:
        admission.admit(1)  # 17 ahead
    assert info.value.status == 503 and info.value.reason == "overloaded"
    with pytest.raises(RequestError):
        admission.check_open()  # and the body of the next request is not even read
    for ticket in tickets:
        admission.release(ticket)
    admission.check_open()
    assert admission.summary()["rejected_overloaded"] == 2


def test_a_burst_after_a_quiet_spell_is_admitted_at_the_warm_up_rate():
    """Only one-face batches since a restart (4 faces/s each): at that rate 64 faces would wait
    16 s, but the replica measured 256 faces/s on a full batch at warm-up, and 64 faces ahead wait
    0.25 s at that rate: within the bound, so the burst is admitted, not refused."""
    admission = Admission(max_pending_faces=10_000, max_wait_s=0.5)
    admission.floor_faces_per_s = 256.0
    for _ in range(8):
        admission.finish_batch(faces=1, encode_s=0.25)
    assert admission.faces_per_s == 256.0
    tickets = [admission.admit(64) for _ in range(3)]  # 128 faces ahead of the third: 0.5 s
    with pytest.raises(RequestError, match=r"wait about 0\.75 s"):
        admission.admit(1)  # 192 ahead: 0.75 s at the warm-up rate, past the bound
    admission.finish_batch(faces=64, encode_s=0.125)  # a full batch now runs faster: 512 faces/s
    assert admission.faces_per_s == 512.0 and admission.summary()["warmup_faces_per_s"] == 256.0
    for ticket in tickets:
        admission.release(ticket)


def test_a_request_that_did_not_start_within_max_wait_is_dropped_when_its_batch_forms():
    admission = Admission(max_pending_faces=10_000, max_wait_s=0.05)
    late, fresh, started = admission.admit(4), admission.admit(4), admission.admit(4)
    late.queued_at -= 1.0  # queued a second ago, never started
    started.queued_at -= 1.0
    started.started = True  # its first chunk ran: later chunks are not dropped
    assert admission.start_batch([late, fresh, started, late]) == [False, True, True, False]
    assert late.expired and fresh.started
    err = admission.expired_error(late)
    assert (err.status, err.reason) == (503, "queue_timeout") and "max_queue_wait_s (0.05 s)" in err.message
    assert admission.summary()["dropped_queue_timeout"] == 1


def _decode_jobs(n: int, limits: Limits) -> list[FaceJob]:
    """``n`` real decode + align jobs: complete 6000x6000 PNGs (36 MP each) with landmarks, as a
    heavy request holds them."""
    kps = source_faces()[0].landmarks
    return [image_job(hostile.flat_png(), kps, f"images[{i}]", limits) for i in range(n)]


def test_the_decode_queue_takes_turns_between_requests():
    """A one-image request arriving behind a 6-image one starts after at most one more image of
    it (plus the one running): the bound of round-robin turns, whatever the images cost."""
    limits = Limits(max_image_pixels=40_000_000)
    small = image_job(hostile.flat_png(112, 112), None, "images[0]", limits)

    async def scenario(queue: FairDecodeQueue):
        heavy = asyncio.ensure_future(queue.run([job.run for job in _decode_jobs(6, limits)]))
        while not queue.order:  # the heavy request has started
            await asyncio.sleep(0.001)
        light = await queue.run([small.run])
        light_done_at = len(queue.order)
        return await heavy, light, light_done_at

    queue = FairDecodeQueue(threads=1, max_wait_s=30.0)
    try:
        heavy, light, started_before_light = asyncio.run(scenario(queue))
    finally:
        queue.close()
    assert len(heavy) == 6 and all(crop.shape == (112, 112, 3) for crop in heavy)
    assert light[0].shape == (112, 112, 3)
    order = list(queue.order)
    light_at = next(i for i, (job, _) in enumerate(order) if job != order[0][0])
    assert light_at <= 2, order  # after the running image and at most one more of the heavy request
    assert started_before_light < 6  # it finished while the heavy request still had images left


def test_a_request_that_cannot_start_decoding_within_max_wait_gets_503():
    limits = Limits(max_image_pixels=40_000_000)

    async def scenario(queue: FairDecodeQueue):
        heavy = asyncio.ensure_future(queue.run([job.run for job in _decode_jobs(2, limits)]))
        while not queue.order:
            await asyncio.sleep(0.001)
        started = time.monotonic()
        with pytest.raises(RequestError) as info:
            await queue.run([lambda: "never runs"])
        await heavy
        return info.value, time.monotonic() - started

    queue = FairDecodeQueue(threads=1, max_wait_s=0.001)  # shorter than any 36 MP decode
    try:
        error, _ = asyncio.run(scenario(queue))
    finally:
        queue.close()
    assert (error.status, error.reason) == (503, "queue_timeout")
    assert "max_queue_wait_s (0.001 s)" in error.message


def test_a_failing_image_fails_its_request_only():
    limits = Limits()
    good = image_job(hostile.flat_png(112, 112), None, "images[0]", limits)
    bad = FaceJob("images[1]", data=hostile.bmp_opencv_raises_on(), pixels=1)

    async def scenario(queue: FairDecodeQueue):
        failing = asyncio.ensure_future(queue.run([good.run, bad.run, good.run]))
        other = await queue.run([good.run, good.run])
        with pytest.raises(RequestError) as info:
            await failing
        return other, info.value

    queue = FairDecodeQueue(threads=2, max_wait_s=30.0)
    try:
        other, error = asyncio.run(scenario(queue))
    finally:
        queue.close()
    assert len(other) == 2 and (error.status, error.reason) == (422, "not_an_image")
    assert error.message.startswith("images[1]: ")
