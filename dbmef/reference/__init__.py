"""The torch reference backend (heavy: torch, diffusers, transformers, timm).

Used for parity tests, baselines and as the source of every exported graph: the modules in
``dbmef.reference.modules`` are exactly what ``dbmef.export`` traces to ONNX.
"""
