"""The names users pick from on the command line, kept in one light module so `--help` needs no torch."""

from __future__ import annotations

IMAGE_ARCHITECTURES = ("resnet18", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet50")
VARIANTS = (
    "eager",
    "torchscript",
    "export",
    "aoti",
    "compile",
    "dynamic_int8",
    "pt2e_int8",
    "bf16",
    "fp16",
    "cuda_graphs",
    "pruned_l1_50",
    "onnx",
    "onnx_int8",
    "onnx_dynamic_int8",
)
QUICK_VARIANTS = ("eager", "torchscript", "export", "dynamic_int8", "bf16", "pruned_l1_50", "onnx", "onnx_int8")
# With --device cuda: half precision, and fp16 replayed as CUDA graphs for bucketed batch sizes.
QUICK_CUDA_VARIANTS = ("eager", "fp16", "bf16", "cuda_graphs")
# Variants whose kernels exist only on the CPU (int8 in torch.ao / ONNX Runtime's CPU provider): skipped on cuda.
CPU_ONLY_VARIANTS = ("dynamic_int8", "pt2e_int8", "onnx_int8", "onnx_dynamic_int8")
CUDA_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def variants_named(value: str | tuple[str, ...], device_type: str = "cpu") -> tuple[str, ...]:
    """`quick` (the quick set of the device), `all`, or a comma list of variant names."""
    if not isinstance(value, str):
        return tuple(value)
    if value == "all":
        return VARIANTS
    if value == "quick":
        return QUICK_CUDA_VARIANTS if device_type == "cuda" else QUICK_VARIANTS
    return tuple(v.strip() for v in value.split(",") if v.strip())


GENERATORS = ("auto", "python", "wrk")  # load generators: auto = wrk when installed and the loop is closed
PEERS = ("flask", "litserve", "torchserve", "triton")  # what `servekit bench --baseline` runs beside it
RUNTIMES = ("torchserve", "triton")  # what serves the model `servekit bench` measures
