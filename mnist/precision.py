"""`trainer.precision`: fp32, or mixed precision with bfloat16 (CPU or a recent GPU) or float16 (GPU)."""
import contextlib

import torch

from mnist import registry
from mnist.errors import UserError


class Precision:
    """`autocast()` goes around forward passes; `scaler` scales the loss, only for fp16
    (bfloat16 has float32's range and needs no scaling; disabled, the scaler passes through)."""

    def __init__(self, name, device):
        if name == "fp16" and device.type != "cuda":
            raise UserError(f"trainer.precision=fp16 needs a GPU, but this run trains on {device}. "
                            f"Use trainer.precision=bf16 on a CPU, or run on a GPU (resources=gpu).")
        # (not torch.cuda.is_bf16_supported(): it also says yes where bfloat16 is only emulated, slowly)
        if name == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            raise UserError(f"trainer.precision=bf16, but {torch.cuda.get_device_name(device)} has no bfloat16. "
                            f"Use trainer.precision=fp16 on this GPU.")
        self.name = name
        self.dtype = getattr(torch, registry.PRECISIONS[name]) if registry.PRECISIONS[name] else None
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
