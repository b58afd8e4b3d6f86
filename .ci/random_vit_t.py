"""Writes a MobileSAM (vit_t) checkpoint with random weights: CI's stand-in for mobile_sam.pt,
which cannot be downloaded there. Usage: python random_vit_t.py OUT.pt"""

import sys
import warnings

import torch

warnings.filterwarnings("ignore")  # timm's registry notices on importing mobile_sam
from mobile_sam import build_sam_vit_t  # noqa: E402

torch.manual_seed(0)
torch.save(build_sam_vit_t().state_dict(), sys.argv[1])
