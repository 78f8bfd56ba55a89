"""The one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) becomes a ``torch.device``."""

from __future__ import annotations

import platform

import torch

from cmafnet.errors import ConfigError


def resolve_device(spec: str | None = "auto", local_rank: int = 0, option: str = "--device") -> torch.device:
    """``auto`` (or None) -> ``cuda:<local_rank>`` when CUDA is available, else CPU; an explicit name is
    checked (a CUDA device on a machine without one is refused, naming ``option``)."""
    if spec in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option}: unknown device '{spec}' (auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option}: '{spec}' is not supported (auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{option}: '{spec}' requested but CUDA is not available to torch on this machine"
            )
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def device_name(device: torch.device) -> str:
    """The card's or the processor's name, for records of speed (``cuda:0`` says too little)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is empty on most Linux systems
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
