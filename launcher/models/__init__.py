"""Small built-in models. Each is an nn.Sequential, so activation checkpointing applies."""

from launcher.models.gpt import GPT
from launcher.models.mlp import MLP
from launcher.models.resnet import ResNet18

__all__ = ["GPT", "MLP", "ResNet18"]
