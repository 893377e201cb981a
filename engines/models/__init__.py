"""Models: resolve a reference to a local ONNX file (``resolve``), facts read from a graph
(``graph``), the synthetic ArcFace architectures (``synthetic``), the real sample faces
(``sample_faces``) and precision conversion of a graph (``precision``)."""

from .graph import GraphFacts, count_macs, graph_facts, graph_input_name
from .resolve import ResolvedModel, cache_root, file_sha256, resolve_model

__all__ = ["GraphFacts", "ResolvedModel", "cache_root", "count_macs", "file_sha256", "graph_facts",
           "graph_input_name", "resolve_model"]
