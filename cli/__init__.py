"""nomoat: open LLaMA-style models and their LoRA adapters on phones and Raspberry Pis."""

import os

__version__ = "0.1.0"

# Private means nothing leaves the machine, or is kept for later: ONNX Runtime's Linux wheels (1.32
# here) write a device id and queue a telemetry event under ~/.cache/Microsoft when the first session
# is made, unless this is set before onnxruntime is imported (ort.disable_telemetry_events() after
# the import does not stop it). Every nomoat module is imported through this package first. A user
# who wants ONNX Runtime's telemetry sets ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
