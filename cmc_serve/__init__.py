"""CMC serving: torch-free inference (sliding-window tiling over exported runtimes) and DICOM/NIfTI I/O."""

__version__ = "0.1.0"
