"""Joint SAE (TopK SAE + integration NFM): model, metrics, training, checkpoints.

Pure torch on activation tensors; model loading, harvesting and splicing live in other sub-packages.
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import SecondaryConfig, TrainConfig
from .model import (COMPONENTS, IntegrationNFM, JointArch, JointOutput, JointSAE, NFMArch, SAEArch,
                    SparseLatents, TopKSAE)
from .refit import refit_decoder_lstsq
from .train import TrainResult, evaluate_reconstruction, train

__all__ = ["COMPONENTS", "Checkpoint", "IntegrationNFM", "JointArch", "JointOutput", "JointSAE", "NFMArch",
           "SAEArch", "SecondaryConfig", "SparseLatents", "TopKSAE", "TrainConfig", "TrainResult",
           "evaluate_reconstruction", "load_checkpoint", "refit_decoder_lstsq", "save_checkpoint", "train"]
