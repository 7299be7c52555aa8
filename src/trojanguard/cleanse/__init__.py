"""Cleansers of backdoored models: ``cleanse(model, data) -> nn.Module`` plus a report."""
