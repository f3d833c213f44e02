"""TensorRT at serve time for the DiT engines: export specs, the engine manifest, loading and running.

``trt_build`` (the ``avatar trt`` commands) exports, checks, builds, inspects and
benchmarks engines; it imports this package, never the other way round.
"""
