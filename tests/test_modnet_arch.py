from __future__ import annotations

import json

from modnet_npu.graph import analysis as modnet_arch
import modnet_arch as modnet_arch_cli


def test_analysis_of_an_anonymous_graph(flavour_files):
    r = modnet_arch.analyse(flavour_files["anonymous"])
    assert r.num_convolutions == 69 and r.num_ibnorm == 16 and r.num_linear == 2
    assert r.num_parameters == 6_476_609 and not r.static_input
    assert 3.8e9 < r.macs < 4.0e9  # MODNet at 256x256: about 3.9 G MACs, 7.8 GFLOP (as analysed by modnet_arch)
    branches = [c.branch for c in r.convs]
    assert branches.count("backbone") == 52 and branches.count("low-res") == 2
    assert branches.count("high-res") == 11 and branches.count("fusion") == 4
    biggest = max(r.convs, key=lambda c: c.macs)
    assert biggest.module == "lr_branch.conv_lr16x.layers.0"
    assert all(c.onnx_node.startswith("node_") for c in r.convs)


def test_cost_grows_with_pixels(webnn_file):
    small = modnet_arch.analyse(webnn_file, 256, 256)
    big = modnet_arch.analyse(webnn_file, 512, 512)
    conv = lambda r: sum(c.macs for c in r.convs)  # noqa: E731  (the SE block's cost is size-free)
    assert conv(big) == 4 * conv(small) and big.static_input


def test_cli_table_and_json(webnn_file, capsys):
    assert modnet_arch_cli.main([webnn_file]) == 0
    text = capsys.readouterr().out
    assert "69 convolutions" in text and "hr_branch.conv_hr2x.0.layers.0" in text
    assert modnet_arch_cli.main([webnn_file, "--json", "--size", "320x480"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["size"] == [320, 480] and len(data["convs"]) == 69


def test_cli_bad_size_and_missing_file(tmp_path, webnn_file, capsys):
    assert modnet_arch_cli.main([webnn_file, "--size", "100"]) == 1
    assert "multiples of 32" in capsys.readouterr().err
    assert modnet_arch_cli.main([str(tmp_path / "nope.onnx")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
