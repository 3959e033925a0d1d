"""awq-edge: AWQ 4-bit quantization and a memory-capped W4A16 runtime for small NVIDIA devices and CPUs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from awq_edge import Engine, Chat` without importing the runtime (or anything heavy) up front.
    if name in ("Engine", "Chat"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'awq_edge' has no attribute {name!r}")
