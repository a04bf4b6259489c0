"""Data sets of docs/method.md §13: JSON / JSON Lines image-caption sets, DMD2-layout latent LMDBs, their builder and
checker, resumable distributed loaders and optional latent / text-embedding caches."""
from senseflow.data.cache import EmbeddingCache, LatentCache, TensorCache, source_fingerprint
from senseflow.data.check import CheckReport, check_dataset, quick_check
from senseflow.data.errors import BadSampleError, DataError
from senseflow.data.factory import dataset_format, open_dataset
from senseflow.data.json_images import ImageCaptionDataset
from senseflow.data.lmdb_latents import LatentLMDBDataset, read_lmdb_header
from senseflow.data.loader import ResumableDataLoader, RobustDataset, build_dataloader, infinite_batches
from senseflow.data.sampler import ResumableDistributedSampler
from senseflow.data.training import TrainingData, build_training_data

__all__ = [
    "BadSampleError",
    "CheckReport",
    "DataError",
    "EmbeddingCache",
    "ImageCaptionDataset",
    "LatentCache",
    "LatentLMDBDataset",
    "ResumableDataLoader",
    "ResumableDistributedSampler",
    "RobustDataset",
    "TensorCache",
    "TrainingData",
    "build_dataloader",
    "build_training_data",
    "check_dataset",
    "dataset_format",
    "infinite_batches",
    "open_dataset",
    "quick_check",
    "read_lmdb_header",
    "source_fingerprint",
]
