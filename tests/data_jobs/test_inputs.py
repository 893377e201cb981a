"""Input discovery and the CPU decode stage, without Ray; hostile inputs of issue 18 among them."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from data_jobs.decode import DecodeLimits, decode_batch
from data_jobs.safe_read import InputRefused, read_limited
from data_jobs.sample import make_sample_episodes
from data_jobs.sources import InputError, discover
from engines import locate
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
        # issue 18: ids that would become unsafe paths or colliding uids, wrong column types, no rows
        ({"episode_id": ["../../v"], "track_id": ["t"], "frame": ["1"], "path": ["x"]}, "cannot be used"),
        ({"episode_id": [""], "track_id": ["t"], "frame": ["1"], "path": ["x"]}, "cannot be used"),
        ({"episode_id": ["a/b"], "track_id": ["t"], "frame": ["1"], "path": ["x"]}, "cannot be used"),
        ({"episode_id": ["/abs"], "track_id": ["t"], "frame": ["1"], "path": ["x"]}, "cannot be used"),
        ({"episode_id": ["e=1"], "track_id": ["t"], "frame": ["1"], "path": ["x"]}, "cannot be used"),
        ({"episode_id": [".hidden"], "track_id": ["t"], "frame": ["1"], "path": ["x"]}, "cannot be used"),
        ({"episode_id": ["e", "e"], "track_id": ["a/b", "a"], "frame": ["c", "b/c"], "path": ["x", "y"]},
         "cannot be used"),  # would share the uid e/a/b/c
        ({"episode_id": ["e"], "track_id": ["t"], "frame": pa.array([-1], pa.int64()), "path": ["x"]},
         "cannot be used"),
        ({"episode_id": ["e"], "track_id": ["t"], "frame": pa.array([1.5]), "path": ["x"]}, "'frame' is do"),
        ({"episode_id": ["e"], "track_id": ["t"], "frame": ["1"], "image": ["not bytes"]},
         "'image' is string; expected a binary column"),
        ({"episode_id": ["e"], "track_id": ["t"], "frame": ["1"], "path": ["x"], "kps": [["a"] * 10]},
         "'kps' is list<"),
        ({"episode_id": ["e"], "track_id": ["t"], "frame": ["1"], "path": pa.array([b"x"])}, "'path' is bin"),
        ({"episode_id": pa.array([], pa.string()), "track_id": pa.array([], pa.string()),
          "frame": pa.array([], pa.string()), "path": pa.array([], pa.string())}, "has no rows"),
        # issue 14: a pass-through column named like one of the job's own output columns
        ({"episode_id": ["e"], "track_id": ["t"], "frame": ["1"], "path": ["x"], "norm": [1.0]},
         r"column\(s\) \['norm'\] would be overwritten"),
        ({"episode_id": ["e"], "track_id": ["t"], "frame": ["1"], "path": ["x"], "embedding": [[1.0]],
          "in_template": [True], "_distance": [0.5]}, r"\['_distance', 'embedding', 'in_template'\]"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, columns, message):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(InputError, match=message):
        discover(locate(str(path)))


def test_pass_through_columns_are_indexed_by_schema_and_unified_over_files(tmp_path):
    """Every column the job does not consume is pass-through; the index keeps its type, not its
    values; a column some files lack is null there; types the files disagree on are refused."""
    ids = {"episode_id": ["e"], "track_id": ["t"], "frame": ["1"], "path": ["x.jpg"]}
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({**ids, "ts": pa.array([1], pa.timestamp("ms", tz="UTC")),
                             "box": pa.array([[1.0, 2.0, 3.0, 4.0]], pa.list_(pa.float32(), 4))}),
                   tmp_path / "m" / "a.parquet")
    pq.write_table(pa.table({**ids, "frame": ["2"], "shot": ["s1"]}), tmp_path / "m" / "b.parquet")
    index = discover(locate(str(tmp_path / "m")))
    assert index.pass_through.names == ["ts", "box", "shot"]
    assert index.pass_through.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert set(index.table.column_names) == {"uid", "episode_id", "track_id", "frame", "path"}
    pq.write_table(pa.table({**ids, "frame": ["3"], "ts": ["not a time"]}), tmp_path / "m" / "c.parquet")
    with pytest.raises(InputError, match="disagree on a column's type"):
        discover(locate(str(tmp_path / "m")))


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
    errors, reasons = list(out["error"]), list(out["reason"])
    assert errors[0] == reasons[0] == "" and np.array_equal(out["crop"][0], cv2.imread(crop_path))
    assert reasons[1] == "unreadable" and "cannot read" in errors[1] and "missing.jpg" in errors[1]
    assert reasons[2] == "not_aligned" and "200x300, not an aligned 112x112 crop" in errors[2]
    assert errors[3] == "" and np.array_equal(out["crop"][3], norm_crop(frame, kps))
    assert reasons[4] == "not_an_image" and "are not a JPEG, PNG" in errors[4]
    assert reasons[5] == "no_image" and "neither image bytes nor a path" in errors[5]


# ---- hostile inputs (issue 18): each a per-row error with its reason, the good row still decodes ----

LIMITS = DecodeLimits(max_image_pixels=40_000_000, max_file_bytes=50_000, read_timeout_s=3.0)
FACE_KPS = [38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2]  # a 112x112 crop's own


def encoded(ext: str, image: np.ndarray | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, np.zeros((112, 112, 3), np.uint8) if image is None else image)
    assert ok
    return buf.tobytes()


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    n = len(rows)
    batch = {k: np.array([f"r{i}" for i in range(n)], object) for k in ("uid", "frame")}
    batch.update(episode_id=np.array(["e"] * n, object), track_id=np.array(["t"] * n, object))
    for key in ("image", "path", "kps"):
        batch[key] = np.empty(n, object)
        batch[key][:] = [r.get(key) for r in rows]
    return batch


def decode_within(batch: dict, seconds: float, **kwargs) -> dict:
    """``decode_batch`` in a daemon thread: a decode that hangs fails the test instead of the suite."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(out=decode_batch(batch, **kwargs)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert "out" in box, f"decode_batch did not return within {seconds} s"
    return box["out"]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, on the crafted TIFF header
def test_hostile_inline_rows_are_per_row_errors_and_the_good_row_decodes(hostile_inline):
    good = encoded(".png", np.arange(112 * 112 * 3, dtype=np.uint8).reshape(112, 112, 3))
    rows = [{"image": data} if kps is None else {"image": data, "kps": kps}
            for _, data, kps, _, _ in hostile_inline]
    rows.append({"image": good, "kps": FACE_KPS})
    out = decode_within(_batch(rows), 60, limits=LIMITS)
    for i, (name, _, _, reason, words) in enumerate(hostile_inline):
        assert (out["reason"][i], words in out["error"][i]) == (reason, True), (name, out["error"][i])
    assert out["reason"][-1] == "" and out["error"][-1] == ""
    np.testing.assert_array_equal(out["crop"][-1], norm_crop(cv2.imdecode(np.frombuffer(good, np.uint8), 1),
                                                             np.asarray(FACE_KPS, np.float32).reshape(5, 2)))


def test_hostile_paths_are_never_read_and_are_per_row_errors(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encoded(".png"))
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # a character device: never ends
    (tmp_path / "big.jpg").write_bytes(encoded(".png") + b"\0" * 60_000)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.jpg"))
    cases = [("fifo.jpg", "not_a_file", "FIFO"), ("dangling.jpg", "not_a_file", "broken symbolic link"),
             ("zero.jpg", "not_a_file", "character device"), ("sock.jpg", "not_a_file", "socket"),
             ("big.jpg", "file_too_large", "at most 50,000"), ("missing.jpg", "unreadable", "no such file")]
    rows = [{"path": name} for name, _, _ in cases] + [{"path": "good.png"}]
    out = decode_within(_batch(rows), 30, base=str(tmp_path), limits=LIMITS)
    sock.close()
    for i, (name, reason, words) in enumerate(cases):
        got = (out["reason"][i], words in out["error"][i], name in out["error"][i])
        assert got == (reason, True, True), (name, out["error"][i])
    assert out["reason"][-1] == "" and np.array_equal(out["crop"][-1], np.zeros((112, 112, 3), np.uint8))


@pytest.mark.timeout(60)
def test_a_stalled_store_read_is_a_read_timeout_not_a_hang(stalled_s3, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encoded(".png"))
    rows = [{"path": "s3://bucket/stalled.jpg"}, {"path": str(good)}]
    started = time.monotonic()
    out = decode_within(_batch(rows), 45, s3={"endpoint_url": stalled_s3, "region": "us-east-1"},
                        limits=LIMITS)
    assert out["reason"][0] == "read_timeout" and "more than 3 s" in out["error"][0], out["error"][0]
    assert out["reason"][1] == ""
    assert time.monotonic() - started < 30


def test_read_limited_reads_no_more_than_the_limit(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    fs = pafs.LocalFileSystem()
    assert read_limited(fs, str(path), 1000, 0) == b"x" * 1000
    with pytest.raises(InputRefused) as info:
        read_limited(fs, str(path), 999, 0)
    assert info.value.reason == "file_too_large"
    with pytest.raises(InputRefused) as info:
        read_limited(fs, "/dev/zero", 1 << 20, 0)
    assert info.value.reason == "not_a_file"


def test_integer_and_dictionary_ids_are_accepted(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"episode_id": pa.array(["e"]).dictionary_encode(), "track_id": pa.array([3]),
                             "frame": pa.array([7], pa.uint16()), "path": ["x.jpg"]}), path)
    assert discover(locate(str(path))).table["uid"].to_pylist() == ["e/3/7"]


def _tree(root: Path) -> Path:
    (root / "ep0" / "t0").mkdir(parents=True)
    (root / "ep0" / "t0" / "00000.jpg").write_bytes(encoded(".png"))
    return root


@pytest.mark.parametrize(
    ("name", "shown"),
    [(b"t\xff", "t\\xff"), (b"t 1", "t 1"), (b"t=1", "t=1"), (b"-t", "-t")],
)
def test_directory_names_outside_the_safe_alphabet_are_refused_naming_the_path(tmp_path, name, shown):
    root = _tree(tmp_path / "episodes")
    os.makedirs(os.path.join(os.fsencode(root / "ep0"), name))
    with open(os.path.join(os.fsencode(root / "ep0"), name, b"00001.jpg"), "wb") as fh:
        fh.write(encoded(".jpg"))
    with pytest.raises(InputError) as info:
        discover(locate(str(root)))
    assert f"ep0/{shown}/00001.jpg" in str(info.value) and "A-Z a-z 0-9" in str(info.value)


def test_a_symlinked_episode_directory_is_refused_not_embedded_twice(tmp_path):
    root = _tree(tmp_path / "episodes")
    (root / "ep1").symlink_to(root / "ep0")
    with pytest.raises(InputError, match="same directory"):
        discover(locate(str(root)))
    (root / "ep1").unlink()
    (root / "ep0" / "t1").symlink_to(root / "ep0" / "t0")  # a track twice, too
    with pytest.raises(InputError, match="same directory"):
        discover(locate(str(root)))
    (root / "ep0" / "t1").unlink()
    outside = _tree(tmp_path / "elsewhere") / "ep0"
    (root / "ep2").symlink_to(outside)  # a link to data stored elsewhere is followed
    assert discover(locate(str(root))).episodes == ["ep0", "ep2"]


def test_special_files_and_broken_links_are_indexed_for_the_errors_table(tmp_path):
    root = _tree(tmp_path / "episodes")
    track = root / "ep0" / "t0"
    os.mkfifo(track / "00001.jpg")
    (track / "00002.jpg").symlink_to(track / "gone.jpg")
    (track / "00003.jpg").symlink_to("/dev/null")
    (track / "00004.jpg").symlink_to(track / "00004.jpg")  # a link loop: one frame, not the whole job
    index = discover(locate(str(root)))
    assert index.table["frame"].to_pylist() == ["00000", "00001", "00002", "00003", "00004"]
