"""Layer-by-layer parity (the code moved to ``compare``; split further in the next commit)."""
from modnet_npu.proof.layerwise.compare import (  # noqa: F401
    BRANCHES, LAYER_THRESHOLDS, MATTE, STAGES, Boundary, LayerRow, LayerwiseError, LayerwiseReport, compare_layers,
    fast_module_name, layerwise_figure, run_onnx,
)
