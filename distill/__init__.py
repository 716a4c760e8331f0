"""distill: multi-teacher knowledge distillation for timm image classifiers."""

__version__ = "0.1.0"
