"""CIFAR (32x32) architectures, registered into timm's model registry on import."""
from .mobilenetv2 import *
from .regnet import *
from .resnet import *
from .shufflenetv2 import *
from .wrn import *
