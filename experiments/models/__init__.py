"""Model builders for the experiments; each takes a dataset's model_kwargs plus its own options.

Classifiers take (num_classes, in_channels, image_size) and return (N, classes) logits; language
models take (vocab_size, max_seq_len) and return (N, T, vocab) logits; the linear model of a
regression stream takes its number of inputs.
"""

from experiments.models.llama2c import ModelArgs, Transformer, llama2c, llama2c_15m, tiny_transformer
from experiments.models.resnet import resnet18, resnet18_cifar
from experiments.models.small import SixBlockMLP, linear, mlp, small_cnn

__all__ = [
    "ModelArgs",
    "SixBlockMLP",
    "Transformer",
    "linear",
    "llama2c",
    "llama2c_15m",
    "mlp",
    "resnet18",
    "resnet18_cifar",
    "small_cnn",
    "tiny_transformer",
]
