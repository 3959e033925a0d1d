"""ONNX export of AWQ checkpoints (installed as awq_edge.export)."""
