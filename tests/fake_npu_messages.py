"""The real torch_npu messages and tables the fake (tests/fake_npu.py) reproduces."""
from __future__ import annotations

# Suffix torch_npu appends to its errors (PTA_ERROR(ErrCode::NOT_SUPPORT)); time, PID and device vary.
_PTA_NOT_SUPPORT = "\n[ERROR] 2025-01-01-00:00:00 (PID:1, Device:0, RankID:-1) ERR00007 PTA feature not supported"
_PTA_INTERNAL = "\n[ERROR] 2025-01-01-00:00:00 (PID:1, Device:-1, RankID:-1) ERR00005 PTA internal error"
_PTA_VALUE = "\n[ERROR] 2025-01-01-00:00:00 (PID:1, Device:0, RankID:-1) ERR00003 PTA invalid value"

#: What torch_npu raises when an aclop (legacy) operator runs during NPU graph capture
#: (NPUGraphsUtils.h assertNotCapturingAclop), here for a Conv2D.
ACLOP_CAPTURE_ERROR = (
    "Cannot run aclop operators during NPU graph capture. Current working aclop is Conv2D. "
    "If you need this call to be captured, please try to set torch.npu.config.allow_internal_format = False. "
    "If still fail, the operator needs aclnn implementation and please file an issue. "
    "Current npuStreamCaptureStatus: npuStreamCaptureStatusActive" + _PTA_NOT_SUPPORT
)

#: What NPUGraph::capture_begin raises when TASK_QUEUE_ENABLE=2.
TASK_QUEUE_CAPTURE_ERROR = (
    "Do not support TASK_QUEUE_ENABLE = 2 during NPU graph capture, please export TASK_QUEUE_ENABLE=1/0."
    + _PTA_NOT_SUPPORT
)

#: What any aclop operator raises when ACL_OP_INIT_MODE=2 (LazyInitAclops); not raised by the fake.
ACL_OP_DISABLED_ERROR = "Acl op is disabled! Please check the environment variable ACL_OP_INIT_MODE." + _PTA_NOT_SUPPORT

#: str() of the real _TorchairImportError (torch_npu 2.9.0 wording; 2.9.0.post2 fixes the spelling).
TORCHAIR_IMPORT_ERROR_TEXT = (
    "\nAn error occured when import `torchair` and the above is the specific error message. \n"
    "This error message was generated when import torchair, but throwed asynchronously here. \n"
    "Please check the error message above. \n" + _PTA_INTERNAL
)

_REPLAY_WITHOUT_CAPTURE = "Called NPUGraph::replay without a preceding successful capture."
_POOL_WITHOUT_CAPTURE = "Called NPUGraph::pool() without a preceding successful capture."
_ALREADY_CAPTURED = ("This NPUGraph instance already owns a captured graph. "
                     "To capture a new graph, create a new instance.")
_DEFAULT_STREAM_CAPTURE = ("NPU graphs must be captured on a non-default stream. "
                           "(However, after capture, it's ok to replay them on the default stream.)")

# set_option's checked values (npu_config.py _option_map)
_OPTION_VALUES = {
    "ACL_PRECISION_MODE": ["allow_fp32_to_fp16", "must_keep_origin_dtype"],
    "ACL_OP_SELECT_IMPL_MODE": ["high_performance", "high_precision"],
    "ACL_OP_DEBUG_LEVEL": ["0", "1", "2", "3", "4"],
    "ACL_OP_COMPILER_CACHE_MODE": ["disable", "enable", "force"],
}
_CANN_MODULES = ("CANN", "RUNTIME", "COMPILER", "HCCL", "TOOLKIT", "OPP", "OPP_KERNEL", "DRIVER")

# what a FakeNpu puts into sys.modules while active
MODULE_NAMES = ("torch_npu", "torch_npu.npu", "torch_npu.npu.utils", "torch_npu._C", "torch_npu.utils",
                "torch.npu", "torchair")
