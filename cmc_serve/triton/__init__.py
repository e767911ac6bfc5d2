"""Serving exported models with NVIDIA Triton Inference Server, without Docker.

`setup` prepares a local `tritonserver` (from the `nvidia-pytriton` wheel) in its own venv,
`server` starts and stops it, `client` talks to it with `tritonclient` and raises the
`errors` classes. Only loopback addresses are ever used; the official container command is
printed for real deployments.
The package is named `cmc_serve.triton`, never a top-level `triton`, which would shadow
OpenAI Triton and break `torch.onnx.export(dynamo=True)` (docs/PLATFORM.md).
"""
