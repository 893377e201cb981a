"""The builder's timing cache: a file TensorRT cannot read must never fail a build.

TensorRT's builder cannot run on a CPU host, so the two ``IBuilderConfig`` methods the timing-cache
step calls are played by ``TimingCacheConfig`` with the behaviours the real binding has:
``create_timing_cache`` answers a blob it cannot read with None (``createTimingCache`` returns
nullptr) and ``set_timing_cache`` refuses a cache from another device with False; passing it None
is a TypeError, because its ``cache`` parameter is a non-optional ``ITimingCache`` (the signature
``test_api_conformance`` reads from the real 10.x and 11.x bindings). Real builds run in tests/gpu.
"""

from __future__ import annotations

import logging

from engines.tensorrt.builder import _load_timing_cache

GOOD = b"TRTCACHE:this-device"
OTHER_DEVICE = b"TRTCACHE:other-device"


class TimingCacheConfig:
    """``create_timing_cache`` / ``set_timing_cache`` as the real binding answers them."""

    def __init__(self, refuse_all: bool = False) -> None:
        self.attached: bytes | None = None
        self.refuse_all = refuse_all

    def create_timing_cache(self, blob: bytes):
        if blob == b"" or blob.startswith(b"TRTCACHE:"):
            return bytes(blob)
        return None  # not a timing cache: TensorRT logs a serialization error and returns nullptr

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache is None:
            raise TypeError("set_timing_cache(): incompatible function arguments. The following argument "
                            "types are supported:\n    1. (self: tensorrt.tensorrt.IBuilderConfig, cache: "
                            "tensorrt.tensorrt.ITimingCache, ignore_mismatch: bool) -> bool")
        if self.refuse_all or (cache == OTHER_DEVICE and not ignore_mismatch):
            return False
        self.attached = cache
        return True


def test_an_unreadable_timing_cache_is_set_aside_and_the_build_gets_an_empty_one(tmp_path, caplog):
    path = tmp_path / "timing" / "trt11.4.0.106-cu13-sm90-d123456.cache"
    path.parent.mkdir()
    path.write_bytes(b"\x00torn write\x00")
    config = TimingCacheConfig()
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.builder"):
        cache = _load_timing_cache(config, path)
    assert cache == b"" and config.attached == b""
    assert not path.exists() and path.with_name(path.name + ".rejected").read_bytes() == b"\x00torn write\x00"
    assert "rejected by TensorRT" in caplog.text


def test_a_timing_cache_from_another_device_is_replaced_by_an_empty_one(tmp_path):
    path = tmp_path / "t.cache"
    path.write_bytes(OTHER_DEVICE)
    config = TimingCacheConfig()
    assert _load_timing_cache(config, path) == b"" and config.attached == b""


def test_a_good_timing_cache_is_used_and_a_missing_one_starts_empty(tmp_path):
    path = tmp_path / "t.cache"
    assert _load_timing_cache(TimingCacheConfig(), path) == b""
    path.write_bytes(GOOD)
    config = TimingCacheConfig()
    assert _load_timing_cache(config, path) == GOOD and config.attached == GOOD and path.exists()


def test_when_tensorrt_refuses_every_timing_cache_the_build_goes_on_without_one(tmp_path, caplog):
    path = tmp_path / "t.cache"
    path.write_bytes(GOOD)
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.builder"):
        assert _load_timing_cache(TimingCacheConfig(refuse_all=True), path) is None
    assert "building without one" in caplog.text


def test_a_timing_cache_path_that_cannot_be_read_starts_empty(tmp_path):
    path = tmp_path / "t.cache"
    path.mkdir()  # a directory where the file should be: reading it is an OSError
    assert _load_timing_cache(TimingCacheConfig(), path) == b""


def test_no_timing_cache_when_it_is_turned_off():
    config = TimingCacheConfig()
    assert _load_timing_cache(config, None) is None and config.attached is None
