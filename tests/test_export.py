"""ONNX export: the graph computes what the module does, and carries no note of the files that made it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from catdogcnn.export import to_onnx


class MeanBrightness(nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.float().mean((1, 2, 3))[:, None] / 255


def test_the_graph_computes_the_module_and_names_no_source_file():
    graph = to_onnx(MeanBrightness(), 8, ["brightness"])
    assert b".py" not in graph and b"site-packages" not in graph  # the exporter's stack traces are dropped
    photos = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    out = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"image": photos})[0]
    np.testing.assert_allclose(out[:, 0], photos.reshape(3, -1).mean(1) / 255, rtol=1e-6)
