"""Image datasets through torchvision: CIFAR-10 (downloadable) and ImageFolder (your own images)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from launcher.recipe.components import require

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cifar10(root: str = "data/cifar10", train: bool = True, download: bool = False, augment: bool = True) -> Dataset:
    """torchvision's CIFAR-10. With download: false and no files under `root`, the error says so."""
    require("torchvision", "launcher.datasets.vision.cifar10")  # the [vision] extra, named if missing
    from torchvision import datasets
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train and augment else []
    tf = T.Compose([*steps, T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    try:
        return datasets.CIFAR10(root=str(Path(root).expanduser()), train=train, download=download, transform=tf)
    except RuntimeError as e:
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found under {root}; set download: true once, or point root at a copy"
            ) from e
        raise


def image_folder(root: str, image_size: int = 224, train: bool = True, augment: bool = True) -> Dataset:
    """torchvision's ImageFolder: one sub-directory of images per class under `root`."""
    require("torchvision", "launcher.datasets.vision.image_folder")  # the [vision] extra, named if missing
    from torchvision import datasets
    from torchvision import transforms as T

    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no such directory: {path} (expected one sub-directory per class)")
    if train and augment:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
    tf = T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return datasets.ImageFolder(str(path), transform=tf)
