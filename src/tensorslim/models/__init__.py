"""Model zoo: ``create_model(name, in_channels=..., num_classes=...)``.

Built-in names: ``lenet5``, ``small_cnn``, ``resnet20``, ``resnet32``, ``resnet44``,
``resnet56``, ``resnet18``, ``resnet50``, ``mobilenet_v2`` (torchvision layouts);
plus ``torchvision:NAME`` (needs the ``vision`` extra) and ``module:function``.
"""

from tensorslim.models import (  # noqa: F401  (register the zoo)
    lenet,
    mobilenet_v2,
    resnet_cifar,
    resnet_imagenet,
    small_cnn,
)
from tensorslim.models.lenet import LeNet5
from tensorslim.models.lstm_lm import TiedLSTMLanguageModel
from tensorslim.models.mobilenet_v2 import MobileNetV2
from tensorslim.models.registry import create_model, list_models, register_model
from tensorslim.models.resnet_cifar import BasicBlock, ResNetCifar
from tensorslim.models.resnet_imagenet import ResNet
from tensorslim.models.small_cnn import SmallCNN

__all__ = [
    "BasicBlock",
    "LeNet5",
    "MobileNetV2",
    "ResNet",
    "ResNetCifar",
    "SmallCNN",
    "TiedLSTMLanguageModel",
    "create_model",
    "list_models",
    "register_model",
]
