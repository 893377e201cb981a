"""Input discovery and the CPU decode stage, without Ray."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_jobs.decode import decode_batch
from data_jobs.sample import make_sample_episodes
from data_jobs.sources import InputError, discover
from data_jobs.storage import locate
from engines.base.align import norm_crop


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample_episodes(tmp_path_factory.mktemp("sample"), episodes=2, tracks=2, frames=4, corrupt=1)


def test_sample_dataset_layouts(sample):
    assert sample.faces == 2 * 2 * 4
    index = discover(locate(sample.directory))
    assert index.kind == "directory" and index.table.num_rows == sample.faces + sample.corrupt
    assert index.episodes == ["ep000", "ep001"]
    manifest = discover(locate(sample.manifest))
    assert manifest.kind == "manifest" and manifest.has_inline_images
    assert sorted(manifest.table["uid"].to_pylist()) == sorted(index.table["uid"].to_pylist())


def test_directory_index_uids_and_misplaced_files(sample, tmp_path, caplog):
    root = tmp_path / "episodes"
    shutil.copytree(sample.directory, root)
    (root / "ep000" / "stray.jpg").write_bytes(b"x")  # not <ep>/<track>/<frame>
    (root / "ep000" / "track000" / "notes.txt").write_text("x")
    index = discover(locate(str(root)))
    assert "ep000/track000/00000" in index.table["uid"].to_pylist()
    assert index.table.num_rows == sample.faces + sample.corrupt
    assert "ignored" in caplog.text


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"episode_id": ["a"], "frame": ["1"], "path": ["x.jpg"]}, "lacks column"),
        ({"episode_id": ["a"], "track_id": ["t"], "frame": ["1"]}, "'image' .bytes. or a 'path'"),
        ({"episode_id": ["a", "a"], "track_id": ["t", "t"], "frame": ["1", "1"], "path": ["x", "y"]},
         "duplicate"),
        ({"episode_id": ["a", None], "track_id": ["t", "t"], "frame": ["1", "2"], "path": ["x", "y"]},
         "null"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, columns, message):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(InputError, match=message):
        discover(locate(str(path)))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover(locate(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input crops"):
        discover(locate(str(tmp_path / "empty")))


def test_decode_batch_reports_each_failure(sample, tmp_path):
    index = discover(locate(sample.directory))
    good = index.table.filter(pa.compute.equal(index.table["frame"], "00000")).slice(0, 1)
    crop_path = good["path"][0].as_py()
    big = tmp_path / "big.jpg"
    cv2.imwrite(str(big), np.zeros((300, 200, 3), np.uint8))
    frame = cv2.imread(str(big))
    kps = np.array([[60, 100], [140, 100], [100, 140], [70, 180], [130, 180]], np.float32)
    batch = {
        "uid": np.array(["a", "b", "c", "d", "e", "f"], object),
        "episode_id": np.array(["e"] * 6, object),
        "track_id": np.array(["t"] * 6, object),
        "frame": np.array(list("123456"), object),
        "path": np.array([crop_path, str(tmp_path / "missing.jpg"), str(big), str(big), None, None], object),
        "image": np.array([None, None, None, None, b"garbage", None], object),
        "kps": np.array([None, None, None, kps.reshape(-1).tolist(), None, None], object),
    }
    out = decode_batch(batch)
    errors = list(out["error"])
    assert errors[0] == "" and np.array_equal(out["crop"][0], cv2.imread(crop_path))
    assert "cannot read" in errors[1]
    assert "200x300, not an aligned 112x112 crop" in errors[2]
    assert errors[3] == "" and np.array_equal(out["crop"][3], norm_crop(frame, kps))
    assert "not a decodable image" in errors[4]
    assert "neither image bytes nor a path" in errors[5]
