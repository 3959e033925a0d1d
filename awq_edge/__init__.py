"""awq-edge: AWQ 4-bit quantization and a memory-capped W4A16 runtime for small NVIDIA devices and CPUs."""

__version__ = "0.1.0"
