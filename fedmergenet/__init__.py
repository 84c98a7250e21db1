"""Federated MergeNet: FedAvg over a MobileNetV2 student with MergeNet parameter fusion
from a frozen ResNet50 teacher, as a Flower app."""

__version__ = "0.1.0"
