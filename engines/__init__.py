"""Shared ArcFace embedding engine: backends, models, drift and benchmarks. No Ray in here.

The public facade: the shells (``serve_app``, ``data_jobs``) import from this
module only, never from its inner modules (a test checks it). The layout
underneath: ``base`` (the contract, the backend template, preprocessing,
alignment), ``backends`` (one module per runtime), ``tensorrt`` (the plan life
cycle), ``models`` (references, graphs, synthetic models, sample faces,
precision conversion), ``config``, ``bench``, ``cli``, and the factory, the
fallback chain and the drift gates beside them.
"""

from .backends.registry import available_backends, backend_names, register
from .base.align import ARCFACE_TEMPLATE, LANDMARK_NAMES, check_landmarks, norm_crop
from .base.contract import EmbeddingEngine, EngineInfo, embedding_contract_id, model_contract
from .base.image import ALLOWED_FORMATS, ImageRejected, check_image_header, decode_image
from .base.preprocess import FACE_SIZE
from .bench.cpu_cost import CpuCost, CpuSampler, cpu_summary
from .bench.ratio import ProcessCpu, ratio_parts, ratio_summary
from .bench.render import replace_readme_section
from .cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    Command,
    DemoStep,
    emit_json,
    positive_int,
    positive_ints,
    quiet_console,
    run_with_exit_codes,
)
from .config.loader import REPO_CONFIG_DIR, load_config
from .config.schema import Config
from .config.typed import build_typed, read_yaml_mapping
from .drift import DriftReport, compare_embeddings, run_embedding_regression_tests
from .errors import (
    BackendUnavailable,
    ConfigError,
    DriftGateError,
    EngineBuildError,
    EngineError,
    ModelResolutionError,
)
from .factory import configured_model, get_engine, load_engine
from .hardware import cpu_model_name
from .identity.assign import IDENTITY_SCHEMA, AssignPolicy, assign_tracks
from .identity.gallery import (
    Gallery,
    gallery_version,
    load_gallery,
    open_gallery_store,
    template_weights,
    weighted_templates,
)
from .identity.sample import SAMPLE_JITTER, SampleGallery, make_sample_gallery, sample_jitters
from .identity.screen_time import SCREEN_TIME_SCHEMA, screen_time
from .identity.search import UNKNOWN, Matches, search
from .models.resolve import ResolvedModel, resolve_model
from .models.sample_faces import (
    FaceSet,
    SourceFace,
    eval_faces,
    jitter_face,
    jittered_faces,
    load_tom_hanks,
    source_faces,
)
from .store.storage import (
    Location,
    check_output_dir,
    delete_files,
    exists,
    is_dir,
    list_files,
    locate,
    orphan_tmp_files,
    read_bytes,
    remove_dir_if_empty,
    write_atomic,
    write_parquet_atomic,
)
from .store.vector_store import VectorStore, import_lance, lance_storage_options

__all__ = [
    "ALLOWED_FORMATS",
    "ARCFACE_TEMPLATE",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_OK",
    "FACE_SIZE",
    "IDENTITY_SCHEMA",
    "LANDMARK_NAMES",
    "REPO_CONFIG_DIR",
    "SAMPLE_JITTER",
    "SCREEN_TIME_SCHEMA",
    "UNKNOWN",
    "AssignPolicy",
    "BackendUnavailable",
    "Command",
    "Config",
    "ConfigError",
    "CpuCost",
    "CpuSampler",
    "DemoStep",
    "DriftGateError",
    "DriftReport",
    "EmbeddingEngine",
    "EngineBuildError",
    "EngineError",
    "EngineInfo",
    "FaceSet",
    "Gallery",
    "ImageRejected",
    "Location",
    "Matches",
    "ModelResolutionError",
    "ProcessCpu",
    "ResolvedModel",
    "SampleGallery",
    "SourceFace",
    "VectorStore",
    "assign_tracks",
    "available_backends",
    "backend_names",
    "build_typed",
    "check_image_header",
    "check_landmarks",
    "check_output_dir",
    "compare_embeddings",
    "configured_model",
    "cpu_model_name",
    "cpu_summary",
    "decode_image",
    "delete_files",
    "embedding_contract_id",
    "emit_json",
    "eval_faces",
    "exists",
    "gallery_version",
    "get_engine",
    "import_lance",
    "is_dir",
    "jitter_face",
    "jittered_faces",
    "lance_storage_options",
    "list_files",
    "load_config",
    "load_engine",
    "load_gallery",
    "load_tom_hanks",
    "locate",
    "make_sample_gallery",
    "model_contract",
    "norm_crop",
    "open_gallery_store",
    "orphan_tmp_files",
    "positive_int",
    "positive_ints",
    "quiet_console",
    "ratio_parts",
    "ratio_summary",
    "read_bytes",
    "read_yaml_mapping",
    "register",
    "remove_dir_if_empty",
    "replace_readme_section",
    "resolve_model",
    "run_embedding_regression_tests",
    "run_with_exit_codes",
    "sample_jitters",
    "screen_time",
    "search",
    "source_faces",
    "template_weights",
    "weighted_templates",
    "write_atomic",
    "write_parquet_atomic",
]
