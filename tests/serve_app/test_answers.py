"""Without Ray: the answers of /v1/embed in each encoding read back to the same float32, the
client reads each (and an older service's), and a wrong encoding or a cut answer is an error."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from serve_app.answers import embed_answer, float32_base64, json_bytes, requested_encoding
from serve_app.client import ServiceError, _Protocol
from serve_app.codec import NPY_MEDIA_TYPE
from serve_app.errors import RequestError

FIELDS = {"dim": 512, "model": "m", "backend": "onnx", "precision": "fp32", "contract": "arcemb-v1-x",
          "synthetic": True}


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((9, 512)).astype(np.float32)
    norms = np.linalg.norm(emb, axis=1).astype(np.float32)
    return emb / norms[:, None], norms


def _headers(resp) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in resp.raw_headers}


@pytest.mark.parametrize("accept, encoding", [("application/json", "json"), ("*/*", "base64"),
                                              (NPY_MEDIA_TYPE, "json")])
def test_every_encoding_reads_back_to_the_same_float32(vectors, accept, encoding):
    emb, norms = vectors
    resp = embed_answer(emb, norms, FIELDS, {"x-total-time": "1.0"}, accept, encoding)
    headers = _headers(resp)
    assert headers["x-total-time"] == "1.0"
    result = _Protocol("http://x")._result(headers, resp.body, 9)
    assert result.embeddings.dtype == np.float32 and result.norms.dtype == np.float32
    np.testing.assert_array_equal(result.embeddings, emb)  # exact: no float lost on the way
    np.testing.assert_array_equal(result.norms, norms)
    assert result.contract == FIELDS["contract"]
    if accept == NPY_MEDIA_TYPE:
        assert headers["content-type"] == NPY_MEDIA_TYPE
        np.testing.assert_array_equal(np.load(io.BytesIO(resp.body)), emb)
    else:
        body = json.loads(resp.body)
        assert body["encoding"] == encoding and body["dim"] == 512
        assert isinstance(body["embeddings"], str if encoding == "base64" else list)


def test_base64_is_little_endian_float32_c_order(vectors):
    emb, _ = vectors
    text = float32_base64(emb[:, ::2])  # a strided view: C order is made, not assumed
    back = np.frombuffer(base64.b64decode(text), "<f4").reshape(9, 256)
    np.testing.assert_array_equal(back, emb[:, ::2])


def test_json_writes_numpy_arrays_scalars_and_nan_as_json():
    out = json.loads(json_bytes({"a": np.arange(3, dtype=np.int64), "b": np.float16(0.5),
                                 "c": np.float32(np.nan), 1: np.eye(2, dtype=np.float32)[:, :1]}))
    assert out == {"a": [0, 1, 2], "b": 0.5, "c": None, "1": [[1.0], [0.0]]}


def test_an_unknown_encoding_is_a_422_naming_the_choices():
    assert requested_encoding({}) == "json" and requested_encoding({"encoding": "base64"}) == "base64"
    with pytest.raises(RequestError) as info:
        requested_encoding({"encoding": "msgpack"})
    assert info.value.status == 422 and "'msgpack'" in info.value.message
    assert "json, base64" in info.value.message and NPY_MEDIA_TYPE in info.value.message


def test_the_client_reads_an_older_services_answers(vectors):
    emb, norms = vectors
    old_json = json.dumps({"embeddings": emb.tolist(), "norms": norms.tolist(), **FIELDS}).encode()
    result = _Protocol("http://x")._result({"content-type": "application/json"}, old_json, 9)
    np.testing.assert_array_equal(result.embeddings, emb)
    buf = io.BytesIO()
    np.save(buf, emb)
    old_npy = _Protocol("http://x")._result({"content-type": NPY_MEDIA_TYPE, "x-arcface-contract": "c"},
                                            buf.getvalue(), 9)
    assert old_npy.norms is None and old_npy.embeddings.shape == (9, 512)


def test_a_cut_base64_answer_is_an_error_not_fewer_faces(vectors):
    emb, norms = vectors
    body = json.loads(embed_answer(emb, norms, FIELDS, {}, "", "base64").body)
    body["embeddings"] = float32_base64(emb[:8])
    with pytest.raises(ServiceError, match=r"embeddings: 16384 bytes, expected 4608 float32"):
        _Protocol("http://x")._result({}, json.dumps(body).encode(), 9)


def test_the_client_asks_for_base64_by_default_and_as_told():
    assert _Protocol("http://x").embed_path == "/v1/embed?encoding=base64"
    assert _Protocol("http://x", accept="json").embed_path == "/v1/embed"
    npy = _Protocol("http://x", accept="npy")
    assert npy.embed_path == "/v1/embed" and npy._answer_headers()["accept"] == NPY_MEDIA_TYPE
    with pytest.raises(ValueError, match="accept base64, json or npy"):
        _Protocol("http://x", accept="xml")


def test_bench_answers_prints_every_encoding_side_by_side(capsys, tmp_path):
    from engines import cli

    assert cli.main(["bench-answers", "--faces", "1,3", "--min-seconds", "0.001", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["faces"]) == {"1", "3"} and out["cpu"]
    for encodings in out["faces"].values():
        assert set(encodings) == {"stdlib_json", "json", "base64", "npy"}
        assert encodings["stdlib_json"]["write_vs_stdlib"] == 1.0
        assert all(e["write_ms"] > 0 and e["read_ms"] > 0 and e["bytes"] > 0 for e in encodings.values())
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench-answers:begin -->\nold\n<!-- bench-answers:end -->\nend\n")
    assert cli.main(["bench-answers", "--faces", "2", "--min-seconds", "0.001", "--readme", str(readme)]) == 0
    written = readme.read_text()
    assert "old" not in written and "| 2 | " in written and "stdlib JSON (before)" in written
    assert "arcface bench-answers --faces 2 --readme README.md" in written and written.endswith("end\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # argparse: a usage error, exit 2
        cli.main(["bench-answers", "--faces", "0"])
    assert info.value.code == 2
    assert "comma-separated positive integers" in capsys.readouterr().err


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _json_answer(emb: np.ndarray, norms: np.ndarray) -> bytes:
    fields = {k: v for k, v in FIELDS.items() if k != "dim"}
    return json.dumps({"embeddings": emb.tolist(), "norms": norms.tolist(), "dim": emb.shape[1],
                       **fields}).encode()


def _bad_answers(emb: np.ndarray, norms: np.ndarray) -> dict[str, tuple[dict, bytes]]:
    js = {"content-type": "application/json"}
    npy = {"content-type": NPY_MEDIA_TYPE, "x-arcface-contract": "c"}
    nan = emb[:5].copy()
    nan[2, 7] = np.nan
    return {
        "one embedding for five faces": (js, _json_answer(emb[:1], norms[:1])),
        "eight embeddings for five faces": (npy, _npy_bytes(emb[:8])),
        "dimension 3": (js, _json_answer(emb[:5, :3] / np.linalg.norm(emb[:5, :3], axis=1, keepdims=True),
                                         norms[:5])),
        "a NaN": (js, _json_answer(nan, norms[:5])),
        "not unit vectors": (npy, _npy_bytes(emb[:5] * 3)),
        "a (2, 7, 3) float64 .npy": (npy, _npy_bytes(np.zeros((2, 7, 3)))),
        "a float64 .npy": (npy, _npy_bytes(emb[:5].astype(np.float64))),
        "a norms count that does not match": (js, _json_answer(emb[:5], norms[:4])),
        "a negative norm": (js, _json_answer(emb[:5], -norms[:5])),
        "not JSON": (js, b"{\"embeddings\": [1, 2"),
        "JSON without the fields": (js, b'{"hello": "world"}'),
        "dim as a string": (js, b'{"embeddings": [], "norms": [], "dim": "x", "contract": "c"}'),
        "dim zero": (js, b'{"embeddings": [], "norms": [], "dim": 0, "contract": "c"}'),
        "a huge dim": (js, b'{"embeddings": [1], "norms": [1], "dim": 1e400, "contract": "c"}'),
        "embeddings as a number": (js, b'{"embeddings": 7, "norms": [1], "dim": 512, "contract": "c"}'),
        "an .npy that is not one": (npy, b"\x93NUMPY garbage"),
    }


@pytest.mark.parametrize("case", list(_bad_answers(np.zeros((9, 512), np.float32), np.ones(9, np.float32))))
def test_an_answer_that_does_not_add_up_is_a_bad_answer_error(vectors, case):
    """The client trusts no server: for 5 faces sent, anything but 5 finite unit float32 vectors
    of a plausible dimension (and 5 positive norms) is a ``BadAnswer`` saying what was wrong."""
    from serve_app.client import BadAnswer

    headers, body = _bad_answers(*vectors)[case]
    with pytest.raises(BadAnswer) as info:
        _Protocol("http://x")._result(headers, body, 5)
    assert (info.value.status, info.value.reason) == (0, "bad_answer") and info.value.message


def test_a_huge_retry_after_is_obeyed_only_up_to_the_policys_bound():
    from serve_app.client import RetryPolicy, _retry_after

    assert RetryPolicy().delay(0, _retry_after("100000000")) == 60.0
    assert RetryPolicy(max_retry_after_s=5).delay(0, 30.0) == 5.0
    assert _retry_after("inf") is None and _retry_after("-3") is None and _retry_after("nan") is None
