"""The converter's public names (the code moved to ``onnx_units``; split further in the next commit)."""
from modnet_npu.conversion.onnx_units import (  # noqa: F401
    CHECKPOINT_SUFFIXES, DATA_INPUTS, HANDLERS, INPUT, BnLabel, Conversion, ConversionError, ConversionReport,
    ConvLabel, Label, LayerMapping, LinearLabel, ModelUnit, OnnxGraph, OnnxUnit, analyse_onnx,
    build_torch_model_from_onnx, convert, describe, fill_state_dict, handler, match_units, save_state_dict,
    trace_model_units,
)
