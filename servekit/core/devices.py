"""Which device a command runs on: `--device auto|cpu|cuda`, resolved once, with a clear error when CUDA is asked
for and absent. GPU plans, training, optimize and bench's in-process side all read it from here."""

from __future__ import annotations

from servekit.core.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto"):
    """'auto' -> cuda:0 when torch sees a GPU, else the CPU; 'cuda' without one is a usage error."""
    import torch

    if name not in DEVICE_CHOICES:
        raise UsageError(f"--device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); use --device cpu")
    return torch.device("cuda", 0)


def synchronize(device) -> None:
    """Waits for the device's queued work, so a timer around a call measures the work and not its launch."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
