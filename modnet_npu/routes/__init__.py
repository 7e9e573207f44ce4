"""Every Ascend route side by side: ``torch`` (torch_npu), ``ort-cann`` (ONNX Runtime's CANN provider) and
``om`` (an ATC-compiled offline model run by ais_bench or ACL), each checked for parity against ONNX Runtime
CPU, timed in one interleaved loop, and explicit about its precision.

The pipeline calls :func:`plan_routes` (cheap checks, at the start), :func:`open_routes` (sessions, ATC, first
calls, once the torch route has the device) and :meth:`OpenRoutes.measure` (parity and timing, after its own
benchmark). See docs/ASCEND.md for installing each route.
"""
from __future__ import annotations

from modnet_npu.routes.base import (
    GE_ONCE_NOTE,
    ROUTE_PRECISIONS,
    ROUTES,
    FirstRun,
    RouteFailedError,
    RouteParity,
    RouteResult,
    RoutesReport,
    RouteSetup,
    RouteUnavailableError,
    parse_routes,
)
from modnet_npu.routes.compare import OpenRoutes, RoutePlan, open_routes, plan_routes

__all__ = [
    "GE_ONCE_NOTE", "ROUTES", "ROUTE_PRECISIONS", "FirstRun", "OpenRoutes", "RouteFailedError", "RouteParity",
    "RoutePlan", "RouteResult", "RouteSetup", "RouteUnavailableError", "RoutesReport", "open_routes",
    "parse_routes", "plan_routes",
]
