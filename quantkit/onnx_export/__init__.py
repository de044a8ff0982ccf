"""ONNX export: float graphs, and GPTQ weights as ONNX Runtime's MatMulNBits (see export.py)."""

from quantkit.onnx_export.export import OnnxExportConfig, OnnxExportResult, export_onnx

__all__ = ["OnnxExportConfig", "OnnxExportResult", "export_onnx"]
