"""Datasets: CIFAR-10/100 (archives or folders), MNIST-family idx files, image folders, and the
embedded UCI digits. Each loads to uint8 image tensors [N, C, H, W] plus int64 labels; batches
are normalized on the fly so memory stays at one byte per pixel."""
from lowbit.data.core import Batches, Dataset, Split, load_dataset, parse_data_spec

__all__ = ["Batches", "Dataset", "Split", "load_dataset", "parse_data_spec"]
