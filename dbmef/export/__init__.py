"""The export side (heavy: torch, diffusers, timm, onnx): writes bundles the runtime loads."""
