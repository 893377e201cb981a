"""``arcface build`` and ``arcface engines ls | pull | push``: TensorRT plans from a shell.

``build`` needs TensorRT and a GPU and says so in one line when either is
missing; ``engines`` needs neither (it moves verified plan files between the
local cache and S3).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, ChecksumMismatch, ConfigError, EngineError, missing_extra
from .common import EXIT_OK, Command, add_config, emit_json, load_cfg, positive_int


# -- build ---------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from ..hardware import has_cuda
    from ..tensorrt.runtime import cuda_python_installed, tensorrt_installed

    cfg = load_cfg(args, **{
        "tensorrt.precision": args.precision,
        "tensorrt.min_batch_size": args.min_batch,
        "tensorrt.opt_batch_size": args.opt_batch,
        "tensorrt.max_batch_size": args.max_batch,
        "tensorrt.workspace_size_mb": args.workspace_mb,
        "tensorrt.device_id": args.device_id,
    })
    if not tensorrt_installed():
        raise missing_extra("tensorrt-cu13", "gpu", "building TensorRT engines")
    if not cuda_python_installed():
        raise missing_extra("cuda-python", "gpu", "building TensorRT engines")
    if not has_cuda():
        raise BackendUnavailable(
            "arcface build needs a CUDA device (an engine is built on the GPU architecture it is for); "
            "none is visible to this process"
        )
    from ..drift_gate import conversion_drift
    from ..factory import configured_model
    from ..tensorrt.plan_cache import get_or_build_plan

    model = configured_model(cfg, args.onnx_path or args.model)
    trt_cfg = replace(cfg.tensorrt, build_locally=True)  # this command exists to build
    measure = functools.partial(conversion_drift, max_drift=cfg.validation.max_drift_cosine,
                                cache_dir=trt_cfg.storage.cache_dir)
    entry = get_or_build_plan(model, trt_cfg, measure_drift=measure)
    out = {"key": entry.key, "path": str(entry.path), "source": entry.source,
           "sha256": entry.sidecar["sha256"], "sidecar": entry.sidecar}
    drift = (entry.sidecar.get("build") or {}).get("graph_drift")
    if args.json:
        emit_json(out)
    else:
        print(f"key     {entry.key}")
        print(f"path    {entry.path}")
        print(f"source  {entry.source} (built | local cache | s3)")
        print(f"sha256  {entry.sidecar['sha256']}")
        if drift:
            print(f"drift   {entry.sidecar['precision']} graph vs fp32 on the CPU before the build: "
                  f"min cosine {drift['min_cosine_sim']:.6f}, mean {drift['mean_cosine_sim']:.6f} "
                  f"({'within' if drift['passed'] else 'OUTSIDE'} the {drift['max_drift']} bound)")
    return EXIT_OK


def _build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx-path", help="ONNX file or any model reference (default: embedding.model)")
    p.add_argument("--model", help="same as --onnx-path")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="default: tensorrt.precision (fp16/int8 are ONNX conversions first)")
    p.add_argument("--min-batch", type=positive_int)
    p.add_argument("--opt-batch", type=positive_int)
    p.add_argument("--max-batch", type=positive_int)
    p.add_argument("--workspace-mb", type=positive_int)
    p.add_argument("--device-id", type=int)
    add_config(p)
    p.add_argument("--json", action="store_true")


# -- engines ls | pull | push -----------------------------------------------------------
def _stores(cfg):
    from ..tensorrt.plan_cache import LocalPlanCache
    from ..tensorrt.plan_store import S3PlanStore

    storage = cfg.tensorrt.storage
    return LocalPlanCache.for_storage(storage), S3PlanStore.from_config(storage)


def _need_store(store):
    if store is None:
        raise ConfigError("tensorrt.storage.type is 'local': there is no S3 engine store to talk to; "
                          "set tensorrt.storage.type: s3 and tensorrt.storage.bucket")
    return store


def _engines_ls(cfg, args) -> dict[str, Any]:
    local, store = _stores(cfg)
    out: dict[str, Any] = {"local_dir": str(local.root), "local": local.entries(), "s3": None}
    if store is not None:
        out["s3_uri"] = str(store.uri(""))
        out["s3"] = store.list()
    if not args.json:
        print(f"local  {local.root}")
        for e in out["local"]:
            print(f"  {e['key']}  {e['size'] / 2**20:8.1f} MiB  {'ok' if e['verified'] else 'UNVERIFIED'}")
        if out["s3"] is not None:
            print(f"s3     {out['s3_uri']}")
            for e in out["s3"]:
                state = "ok" if e["complete"] else ("building" if e["building"] else "no sidecar")
                print(f"  {e['key']}  {e['size'] / 2**20:8.1f} MiB  {state}")
    return out


def _engines_pull(cfg, args) -> dict[str, Any]:
    from ..tensorrt.plan_key import parse_key

    if parse_key(args.key) is None:
        raise ValueError(
            f"{args.key!r} is not an engine key "
            "(model-sha8-precision-smXY-dDEV6-trtV-cuN-bMIN_OPT_MAX.plan; see README 'TensorRT engines')"
        )
    local, store = _stores(cfg)
    store = _need_store(store)
    with local.lock(args.key, timeout=cfg.tensorrt.wait_timeout_s):
        sidecar = store.sidecar(args.key)
        if sidecar is None:
            raise EngineError(f"{store.uri(args.key)} is not published (no sidecar); `arcface engines ls`")
        store.download(args.key, local.plan_path(args.key), sidecar["sha256"])
        local.write_sidecar(args.key, sidecar)
    path = local.plan_path(args.key)
    if not args.json:
        print(f"pulled {store.uri(args.key)} -> {path} (sha256 verified)")
    return {"key": args.key, "path": str(path), "sha256": sidecar["sha256"]}


def _engines_push(cfg, args) -> dict[str, Any]:
    import json

    from ..s3 import sha256_file
    from ..tensorrt.plan_key import parse_key

    local, store = _stores(cfg)
    store = _need_store(store)
    path = Path(args.path)
    if not path.is_file() and local.plan_path(args.path).is_file():
        path = local.plan_path(args.path)  # a key of the local cache
    if not path.is_file():
        raise ValueError(f"{args.path} is neither a plan file nor a key in {local.root}")
    if parse_key(path.name) is None:
        raise ValueError(f"{path.name} is not named like an engine key; the name is the key others look up")
    side = path.with_name(path.name + ".json")
    if not side.is_file():
        raise ValueError(f"{side} is missing: a plan is pushed with its sidecar (sha256, build facts)")
    sidecar = json.loads(side.read_text())
    actual = sha256_file(path)
    if actual != sidecar.get("sha256"):
        raise ChecksumMismatch(f"{path}: sha256 {actual} does not match its sidecar "
                               f"({sidecar.get('sha256')}); refusing to publish it")
    store.upload(path.name, path, sidecar)
    if not args.json:
        print(f"pushed {path} -> {store.uri(path.name)}")
    return {"key": path.name, "uri": str(store.uri(path.name)), "sha256": actual}


def cmd_engines(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    action = {"ls": _engines_ls, "pull": _engines_pull, "push": _engines_push}[args.engines_cmd]
    out = action(cfg, args)
    if args.json:
        emit_json(out)
    return EXIT_OK


def _engines_arguments(p: argparse.ArgumentParser) -> None:
    esub = p.add_subparsers(dest="engines_cmd", required=True)
    ls = esub.add_parser("ls", help="engines in the local cache and in the S3 store")
    pull = esub.add_parser("pull", help="download KEY from S3 into the local cache (sha256 verified)")
    pull.add_argument("key")
    push = esub.add_parser("push", help="upload a plan (with its .json sidecar) to S3")
    push.add_argument("path", help="a .plan file next to its .json sidecar, or a key of the local cache")
    for sp in (ls, pull, push):
        add_config(sp)
        sp.add_argument("--json", action="store_true")


BUILD = Command("build", "convert a model, build its TensorRT engine into the engine cache",
                _build_arguments, cmd_build, order=100)
ENGINES = Command("engines", "list, pull or push TensorRT engines (local cache <-> S3)",
                  _engines_arguments, cmd_engines, order=110)
