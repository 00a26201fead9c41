"""InsightFace interop: ArcFace ONNX weights into faces.IResNet, SCRFD detection (the `faces` extra)."""
