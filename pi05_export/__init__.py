"""pi05-export: Pi0.5 checkpoints to validated ONNX and TensorRT engines."""

__version__ = "0.1.0"
