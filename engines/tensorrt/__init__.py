"""A TensorRT plan's whole life cycle, one module per step, in reading order.

- ``runtime``: the lazy ``import tensorrt``, its version, the shared logger;
- ``cuda``: checked cuda-python calls (device facts, buffers, streams);
- ``plan_key``: what a plan is specific to (graph, precision, profile, GPU, TensorRT);
- ``plan_cache``: key -> verified plan bytes: local cache, S3, or a build under a lock;
- ``plan_store``: the S3 side: plans, sidecars and the conditional-put build lock;
- ``builder``: ONNX graph -> plan (the real build step);
- ``runner``: plan bytes -> engine, context, stream and buffers that embed a batch.

"Plan" is TensorRT's serialized engine; the ``tensorrt`` *backend* that uses
all this is ``engines.backends.tensorrt``. Nothing here imports ``tensorrt`` or
CUDA at import time.
"""
