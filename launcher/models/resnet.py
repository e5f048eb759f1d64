"""torchvision's ResNet-18, as an nn.Sequential (so checkpoint_sequential applies): the same modules,
parameters and computation, in the order torchvision's forward runs them.

The stem's ReLU is not in-place here: at a checkpoint segment boundary an in-place ReLU would
overwrite the tensor the checkpoint keeps to recompute from. (Inside the residual blocks, each one
module, in-place is harmless.)"""

from __future__ import annotations

from torch import nn

from launcher.recipe.components import require


def ResNet18(num_classes: int = 10) -> nn.Sequential:
    m = require("torchvision.models", "launcher.models.ResNet18").resnet18(num_classes=num_classes)
    return nn.Sequential(
        m.conv1, m.bn1, nn.ReLU(), m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4, m.avgpool, nn.Flatten(), m.fc
    )
