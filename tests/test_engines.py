from __future__ import annotations

import engines


def test_auto_backend_choice(monkeypatch):
    import devices
    import torch

    assert engines.choose_backend("ort", "auto")[0] == "ort"
    assert engines.choose_backend("auto", "cpu")[0] == "torch"
    monkeypatch.setattr(devices, "select_device", lambda spec: torch.device("cpu"))
    backend, why = engines.choose_backend("auto", "auto")
    assert backend == "ort" and "faster engine" in why
    monkeypatch.setattr(devices, "select_device", lambda spec: torch.device("cuda", 0))
    assert engines.choose_backend("auto", "auto")[0] == "torch"
