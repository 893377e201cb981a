from __future__ import annotations

import pytest
import yaml

from engines.config import load_config
from engines.errors import ConfigError


def _write(tmp_path, data, name="embedding.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_config_loads_with_tensorrt_section():
    cfg = load_config(environ={})
    assert cfg.embedding.backend == "auto"
    assert cfg.embedding.fallback == ("onnx", "insightface")
    assert cfg.tensorrt.opt_batch_size == 32 and cfg.tensorrt.precision == "fp16"
    assert cfg.validation.max_drift_cosine == 0.001
    assert cfg.source.endswith("embedding.yaml")


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, {"embedding": {"backnd": "onnx"}})
    with pytest.raises(ConfigError, match=r"embedding.*unknown key.*backnd"):
        load_config(path, environ={})


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key.*servng"):
        load_config(_write(tmp_path, {"servng": {}}), environ={})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"embedding": {"batch_size": "big"}}, "embedding.batch_size: expected an integer"),
        ({"embedding": {"batch_size": 0}}, "must be >= 1"),
        ({"embedding": {"backend": "trt"}}, "not one of"),
        ({"embedding": {"fallback": "onnx"}}, None),  # a string is a one-item list
        ({"embedding": {"fallback": ["onnx", "cuda"]}}, "not a backend"),
        ({"embedding": {"batch_size": 256}}, "batch_size .256. must be <= "),
        ({"validation": {"max_drift_cosine": "x"}}, "expected a number"),
        ({"validation": {"enabled": "maybe"}}, "true or false"),
        ({"storage": {"type": "s3"}}, "bucket is required"),
        ({"embedding": ["not", "a", "mapping"]}, "expected a mapping"),
    ],
)
def test_bad_values_are_explained(tmp_path, data, message):
    path = _write(tmp_path, data)
    if message is None:
        assert load_config(path, environ={}).embedding.fallback == ("onnx",)
        return
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("embedding: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path, environ={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_environment_overrides(tmp_path):
    env = {
        "ARCFACE_BACKEND": "onnx",
        "ARCFACE_MODEL": "synthetic:mobilefacenet",
        "ARCFACE_BATCH_SIZE": "8",
        "ARCFACE_FALLBACK": "insightface",
        "ARCFACE_STORAGE__ENDPOINT_URL": "http://127.0.0.1:9000",
        "ARCFACE_VALIDATION__RUN_ON_STARTUP": "true",
        "ARCFACE_TENSORRT__STORAGE__BUCKET": "engines",
    }
    cfg = load_config(environ=env)
    assert cfg.embedding.backend == "onnx"
    assert cfg.embedding.model == "synthetic:mobilefacenet"
    assert cfg.embedding.batch_size == 8
    assert cfg.embedding.fallback == ("insightface",)
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.validation.run_on_startup is True
    assert cfg.tensorrt.storage.bucket == "engines"


def test_bad_environment_override_is_named():
    with pytest.raises(ConfigError, match=r"embedding\.batch_size"):
        load_config(environ={"ARCFACE_BATCH_SIZE": "lots"})
    with pytest.raises(ConfigError, match=r"unknown key.*nonsense"):
        load_config(environ={"ARCFACE_EMBEDDING__NONSENSE": "1"})


def test_a_variable_named_after_a_key_that_sets_nothing_is_warned_about_once(caplog):
    env = {"ARCFACE_GALLERY": "s3://bucket/gallery", "ARCFACE_SERVE_TOKEN": "x", "ARCFACE_MODEL": "m"}
    with caplog.at_level("WARNING", logger="engines.config.loader"):
        cfg = load_config(environ=env)
        load_config(environ=env)
    assert cfg.identity.gallery != "s3://bucket/gallery"  # it set nothing
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["ARCFACE_GALLERY sets nothing: no setting has that name; "
                        "did you mean ARCFACE_IDENTITY__GALLERY?"], warnings


def test_cli_style_overrides_win_over_env():
    cfg = load_config(environ={"ARCFACE_BACKEND": "onnx"}, overrides={"embedding.backend": "insightface"})
    assert cfg.embedding.backend == "insightface"


def test_missing_tensorrt_config_file_is_named(tmp_path):
    path = _write(tmp_path, {"embedding": {"tensorrt_config": "trt-prod.yaml"}})
    with pytest.raises(ConfigError, match=r"tensorrt_config names 'trt-prod.yaml'.*does not exist"):
        load_config(path, environ={})


def test_default_tensorrt_config_may_be_absent_but_a_named_one_is_read(tmp_path):
    # the default name, absent next to the config (explicitly or implicitly): defaults apply
    for data in ({"embedding": {"backend": "onnx"}},
                 {"embedding": {"tensorrt_config": "arcface_tensorrt.yaml"}}):
        assert load_config(_write(tmp_path, data), environ={}).tensorrt.opt_batch_size == 32
    _write(tmp_path, {"tensorrt": {"opt_batch_size": 16, "max_batch_size": 64}}, name="trt-prod.yaml")
    cfg = load_config(_write(tmp_path, {"embedding": {"tensorrt_config": "trt-prod.yaml"}}), environ={})
    assert cfg.tensorrt.opt_batch_size == 16
