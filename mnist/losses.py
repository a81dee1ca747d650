"""The losses conf/loss/ offers (mnist/registry.py's LOSSES), applied as the course's notebooks apply them.

The classification losses (nll, cross_entropy) take the model's output and the labels. The others
compare the output with one-hot targets (ten columns, 1.0 at the label): probabilities (a softmax
model) for mse, bce, smooth_l1 and huber, logits (model.output=none) for bce_with_logits.
config.validate refuses a loss on an output it does not fit, on the login node.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist import registry

CLASSES = 10


class Loss:
    """loss(output, target): the batch's mean loss, what training steps on (torch's default reduction).
    loss(output, target, reduction="sum"): summed over the batch's samples, so that the test set's
    "Average loss" (that sum over the set / its size) is the same mean, over one-hot columns too."""

    def __init__(self, loss_cfg, output):  # loss_cfg: conf/loss/<name>.yaml, a dict or a DictConfig
        entry = registry.LOSSES[loss_cfg["name"]]
        options = {k: v for k, v in loss_cfg.items() if k != "name"}
        self.criteria = {r: getattr(nn, entry.torch_class)(reduction=r, **options) for r in ("mean", "sum")}
        self.one_hot = entry.targets == "one_hot"
        self.log_first = loss_cfg["name"] == "nll" and output == "softmax"  # the sigmoid MLP's probabilities

    def __call__(self, output, target, reduction="mean"):
        if torch.is_autocast_enabled(output.device.type):  # BCE refuses autocast
            with torch.autocast(output.device.type, enabled=False):  # (entered only here: it costs ~4% of an
                return self(output, target, reduction)               # MLP's CPU step, measured)
        output = output.float()  # every loss in float32, a bf16/fp16 output's too (evaluate's, outside autocast)
        if self.log_first:
            output = output.clamp_min(1e-12).log()
        if self.one_hot:
            target = F.one_hot(target, CLASSES).float()
        loss = self.criteria[reduction](output, target)
        return loss / CLASSES if self.one_hot and reduction == "sum" else loss
