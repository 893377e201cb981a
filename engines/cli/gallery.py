"""``arcface gallery enroll|ls|remove|calibrate``: the gallery of known identities (README
"Gallery and identify"). ``ls`` and ``remove`` start no engine: the gallery's stamp says its
contract and dimension."""

from __future__ import annotations

import argparse
from typing import Any

from .common import EXIT_OK, Command, add_common, emit_json, load_cfg, positive_int


def _gallery_uri(args: argparse.Namespace, cfg) -> str:
    uri = args.gallery or cfg.identity.gallery
    if not uri:
        raise ValueError("no gallery: give --gallery PATH|s3://... or set identity.gallery in the config")
    return uri


def _engine(args: argparse.Namespace, cfg):
    from ..factory import get_engine

    return get_engine(args.backend or cfg.embedding.backend, args.model, config=cfg)


def existing_store(uri: str, cfg):
    """The store of an existing gallery, under the contract its stamp names."""
    from ..errors import ConfigError
    from ..store.vector_store import VectorStore

    probe = VectorStore(uri, "", cfg.storage.endpoint_url, cfg.storage.region)
    stamp = probe.read_stamp()
    if stamp is None:
        raise ConfigError(f"no gallery at {uri} (no _arcface_store.json): enroll into it first")
    return VectorStore(uri, stamp["contract"], cfg.storage.endpoint_url, cfg.storage.region), stamp


def cmd_enroll(args: argparse.Namespace) -> int:
    from ..identity.gallery import enroll, open_gallery_store
    from ..identity.inputs import read_enroll_input

    cfg = load_cfg(args)
    uri = _gallery_uri(args, cfg)
    faces = read_enroll_input(args.faces)
    engine = _engine(args, cfg)
    info = engine.info
    store = open_gallery_store(uri, info.contract, info.model_id, info.embedding_dim,
                               cfg.storage.endpoint_url, cfg.storage.region)
    embeddings, norms = engine.encode_with_norms(faces.crops)
    table = enroll(store, faces.identities, faces.sources, embeddings, norms, cfg.identity.template_weighting)
    enrolled = sorted(set(faces.identities))
    report = {"gallery": uri, "contract": info.contract, "model": info.model_id, "backend": info.backend,
              "faces": len(faces.identities), "enrolled": enrolled, "identities": table.num_rows}
    if args.json:
        emit_json(report)
    else:
        print(f"enrolled {len(faces.identities)} faces of {len(enrolled)} identities into {uri} "
              f"({table.num_rows} identities; contract {info.contract}, model {info.model_id})")
    return EXIT_OK


def _listing(store) -> list[dict[str, Any]]:
    from ..identity.gallery import IDENTITIES

    ds = store.dataset(IDENTITIES)
    if ds is None:
        return []
    rows = ds.to_table(columns=["identity", "members", "mean_norm"]).to_pylist()
    return sorted(rows, key=lambda r: r["identity"])


def cmd_ls(args: argparse.Namespace) -> int:
    from ..identity.gallery import gallery_version

    cfg = load_cfg(args)
    uri = _gallery_uri(args, cfg)
    store, stamp = existing_store(uri, cfg)
    rows = _listing(store)
    if args.json:
        emit_json({"gallery": uri, "contract": stamp["contract"], "model": stamp.get("model_id"),
                   "version": gallery_version(store), "identities": rows})
        return EXIT_OK
    print(f"gallery {uri}: {len(rows)} identities, contract {stamp['contract']} "
          f"(model {stamp.get('model_id')})")
    if rows:
        print(f"{'identity':<32} {'members':>7} {'mean norm':>9}")
        for r in rows:
            print(f"{r['identity']:<32} {r['members']:>7} {r['mean_norm']:>9.3f}")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    from ..identity.gallery import remove

    cfg = load_cfg(args)
    uri = _gallery_uri(args, cfg)
    store, stamp = existing_store(uri, cfg)
    table = remove(store, args.names, int(stamp["embedding_dim"]), cfg.identity.template_weighting)
    if args.json:
        emit_json({"gallery": uri, "removed": args.names, "identities": table.num_rows})
    else:
        print(f"removed {', '.join(args.names)} from {uri}; {table.num_rows} identities left")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Thresholds at the asked false-match rates on a labelled set (all impostor pairs by default)."""
    from pathlib import Path

    import numpy as np

    from ..evaluate.labelled import identity_pairs, load_identity_dir
    from ..evaluate.metrics import eer, tar_at_far

    cfg = load_cfg(args)
    faces = load_identity_dir(Path(args.faces))
    pairs = identity_pairs(faces.identities, args.impostors or 10**12, args.seed)
    engine = _engine(args, cfg)
    emb = engine.encode(faces.crops)
    scores = np.sum(emb[pairs.first] * emb[pairs.second], axis=1)
    points = [tar_at_far(scores, pairs.same, far).to_dict() for far in args.far]
    rate, at = eer(scores, pairs.same)
    info = engine.info
    report = {"model": info.model_id, "contract": info.contract, "faces": len(faces.identities),
              "identities": len(set(faces.identities)), "genuine": int(pairs.same.sum()),
              "impostors": int((~pairs.same).sum()), "thresholds": points,
              "eer": {"rate": rate, "threshold": at}, "synthetic": info.model_id.startswith("synthetic")}
    if args.json:
        emit_json(report)
        return EXIT_OK
    print(f"{report['model']}{' (SYNTHETIC: identifies nobody)' if report['synthetic'] else ''}: "
          f"{report['faces']} faces of {report['identities']} identities, {report['genuine']} genuine / "
          f"{report['impostors']} impostor pairs")
    for p in points:
        note = "" if p["resolvable"] else f"  (too few impostor pairs to measure FAR {p['far_target']:g})"
        print(f"FAR <= {p['far_target']:g}: threshold {p['threshold']:.4f} (TAR {p['tar']:.4f}, "
              f"measured FAR {p['far']:.2e}){note}")
    print(f"EER {rate:.4f} at threshold {at:.4f}; set identity.threshold (and identity.cluster_distance "
          "about 1 - threshold) from the FAR your use allows")
    return EXIT_OK


def _far(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a false-match rate in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a false-match rate in (0, 1), got {value}")
    return value


def _shared(p: argparse.ArgumentParser, engine: bool) -> None:
    add_common(p, model=engine)
    p.add_argument("--gallery",
                   help="gallery location: a path or s3://bucket/prefix (default: identity.gallery)")
    if engine:
        p.add_argument("--backend", help="backend (default: embedding.backend)")
    p.add_argument("--json", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="gallery_cmd", required=True)
    enroll = sub.add_parser("enroll", help="embed faces and store one template per identity")
    _shared(enroll, engine=True)
    enroll.add_argument("--faces", required=True,
                        help="a directory <identity>/<image> (aligned crops, or images with <image>.json "
                             "landmarks) or a Parquet manifest (identity, image|path, kps?)")
    enroll.set_defaults(_gallery_run=cmd_enroll)
    ls = sub.add_parser("ls", help="list the identities of a gallery")
    _shared(ls, engine=False)
    ls.set_defaults(_gallery_run=cmd_ls)
    rm = sub.add_parser("remove", help="remove identities (and their members)")
    _shared(rm, engine=False)
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(_gallery_run=cmd_remove)
    cal = sub.add_parser("calibrate", help="the cosine threshold at a false-match rate, on labelled faces")
    _shared(cal, engine=True)
    cal.add_argument("--faces", required=True, help="a labelled directory <identity>/<image>")
    cal.add_argument("--far", type=_far, action="append",
                     help="false-match rate(s) to report (repeatable; default 1e-2, 1e-3, 1e-4)")
    cal.add_argument("--impostors", type=positive_int, help="impostor pairs to draw (default: all)")
    cal.add_argument("--seed", type=int, default=0)
    cal.set_defaults(_gallery_run=cmd_calibrate)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "far", None) is None and args.gallery_cmd == "calibrate":
        args.far = [1e-2, 1e-3, 1e-4]
    return args._gallery_run(args)


COMMAND = Command("gallery", "gallery of known identities: enroll, ls, remove, calibrate", add_arguments, run,
                  order=60)
