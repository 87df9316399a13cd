"""Model zoo: ``create_model(name, in_channels=..., num_classes=...)``.

Built-in names: ``lenet5``, ``small_cnn``, ``resnet20``, ``resnet32``, ``resnet44``,
``resnet56``, ``resnet18``, ``resnet34`` (ImageNet-style, torchvision layout); plus
``torchvision:NAME`` (needs the ``vision`` extra) and ``module:function``.
"""

from tensorslim.models import lenet, resnet_cifar, resnet_imagenet, small_cnn  # noqa: F401
from tensorslim.models.lenet import LeNet5
from tensorslim.models.registry import create_model, list_models, register_model
from tensorslim.models.resnet_cifar import BasicBlock, ResNetCifar
from tensorslim.models.small_cnn import SmallCNN

__all__ = [
    "BasicBlock",
    "LeNet5",
    "ResNetCifar",
    "SmallCNN",
    "create_model",
    "list_models",
    "register_model",
]
