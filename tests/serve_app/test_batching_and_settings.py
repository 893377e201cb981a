from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engines import get_engine
from engines.errors import ConfigError
from serve_app.batching import (
    BatchItem,
    BatchStats,
    count_faces,
    engine_batch_target,
    run_batch,
    split_request,
)
from serve_app.settings import TokenAuth, parse_settings, parse_user_config


def test_count_faces_is_total():
    items = [BatchItem(np.zeros((3, 112, 112, 3), np.uint8)), BatchItem(np.zeros((5, 112, 112, 3)))]
    assert count_faces(items) == 8
    assert count_faces([object(), None]) == 2  # never raises (a raise would kill Serve's batcher)


def test_split_request_respects_max_batch(faces):
    chunks = split_request(faces, 8)
    assert [len(c) for c in chunks] == [8, 8, 5]
    assert np.array_equal(np.concatenate(chunks), faces)
    with pytest.raises(ValueError):
        split_request(faces, 0)


def test_run_batch_splits_results_back_per_item(mbf_model, faces):
    engine = get_engine("onnx", mbf_model)
    items = [BatchItem(faces[:3]), BatchItem(faces[3:4]), BatchItem(faces[4:10])]
    out = run_batch(engine, items)
    assert [len(e) for e, _ in out] == [3, 1, 6]
    direct = engine.encode(faces[:10])
    np.testing.assert_allclose(np.concatenate([e for e, _ in out]), direct, atol=1e-6)


def test_max_batch_comes_from_the_engine_profile(mbf_model):
    """user_config max_batch_size null: the engine's optimal batch, config only as fallback."""
    info = get_engine("onnx", mbf_model).info  # real onnx engine: no profile in its runtime info
    assert info.max_batch_size == 128
    assert engine_batch_target(info, 32) == (32, "embedding.opt_batch_size")
    assert engine_batch_target(replace(info, max_batch_size=16), 32)[0] == 16
    # what the tensorrt backend reports: runtime.tensorrt.io.profile, read from the plan
    trt = {"tensorrt": {"version": "10.3.0", "io": {"input": "input.1", "profile": [1, 64, 256]}}}
    batch, source = engine_batch_target(replace(info, backend="tensorrt", runtime=trt), 32)
    assert batch == 64 and source == "tensorrt engine profile opt batch (1/64/256)"
    capped = replace(info, backend="tensorrt", runtime=trt, max_batch_size=48)
    assert engine_batch_target(capped, 32) == (
        48, "tensorrt engine profile opt batch (1/64/256), capped at the engine's max_batch_size 48")
    fixed = {"tensorrt": {"io": {"profile": [8, 8, 8]}}}  # a plan built for one batch size
    assert engine_batch_target(replace(info, runtime=fixed), 32)[0] == 8
    for bad in ([64, 1, 256], [0, 0, 0], [1, 64], [1, 64.0, 128], "1/64/128", None):
        broken = {"tensorrt": {"io": {"profile": bad}}}
        assert engine_batch_target(replace(info, runtime=broken), 32) == (32, "embedding.opt_batch_size")


def test_batch_stats_summary():
    stats = BatchStats()
    for faces in (1, 3, 32):
        stats.record(faces, chunks=faces, wait_s=0.001, encode_s=0.01)
    s = stats.summary()
    assert s["batches"] == 3 and s["faces"] == 36
    assert s["recent"]["max_batch_faces"] == 32
    assert s["faces_per_batch_histogram"]["<=32"] == 1


def test_settings_are_typed():
    s = parse_settings({"max_faces_per_request": 10, "model": "synthetic:mobilefacenet"})
    assert s.max_faces_per_request == 10
    with pytest.raises(ConfigError, match="unknown key"):
        parse_settings({"max_face": 1})
    with pytest.raises(ConfigError, match=">= 1"):
        parse_settings({"max_faces_per_request": 0})
    assert parse_user_config({"max_batch_size": 16}).max_batch_size == 16
    with pytest.raises(ConfigError, match=r"user_config\.batch_wait_timeout_s"):
        parse_user_config({"batch_wait_timeout_s": "soon"})


def test_token_auth(tmp_path):
    assert TokenAuth(None).check(None)  # auth off
    auth = TokenAuth("s3cret")
    assert auth.enabled and auth.check("Bearer s3cret") and auth.check("bearer s3cret")
    assert not auth.check(None) and not auth.check("Bearer wrong") and not auth.check("s3cret")
    token = tmp_path / "token"
    token.write_text("from-file\n")
    assert TokenAuth.from_settings(parse_settings({"auth_token_file": str(token)})).check("Bearer from-file")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        TokenAuth.from_settings(parse_settings({"auth_token_file": str(tmp_path / "empty")}))
