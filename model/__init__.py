"""The VQ-VAE latent action model.

    from model import load_checkpoint
    lam = load_checkpoint("checkpoints/latent_action/best.pt", "cuda")
    codes = lam.encode(cur, nxt, prev=None)     # int64 (B, 7, 5) in [0, 256)
    pred = lam.decode(cur, codes, prev=None)    # (B, C, 210, 160) in [0, 1]
    # prev: frame t-1, shaped like cur; used when lam.config.context is 1 (None: frame t stands in)
    lam.codebook                        # (256, 128) code vectors; lam.config: ModelConfig
"""
from model.checkpoint import (CHECKPOINT_FORMAT, CheckpointFile, clean_state_dict, load_checkpoint, read_checkpoint,
                              read_checkpoint_file, save_checkpoint, unwrap)
from model.config import ModelConfig
from model.lam import LatentActionModel
from model.quantizer import Quantizer

__all__ = ["CHECKPOINT_FORMAT", "CheckpointFile", "LatentActionModel", "ModelConfig", "Quantizer", "clean_state_dict",
           "load_checkpoint", "read_checkpoint", "read_checkpoint_file", "save_checkpoint", "unwrap"]
