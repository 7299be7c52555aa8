"""Guard: detector + model as one module / ONNX graph returning logits, suspicion score and flag."""
