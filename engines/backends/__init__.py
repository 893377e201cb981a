"""One module per runtime (``onnx``, ``openvino``, ``insightface``, ``tensorrt``), each a
``BaseEngine`` registered by name in ``registry``. Every module imports its runtime lazily,
so all of them import with only the base dependencies installed."""

from .registry import available_backends, backend_names, get_backend_class, register

__all__ = ["available_backends", "backend_names", "get_backend_class", "register"]
