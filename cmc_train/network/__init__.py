"""The CMC network (two SAM-Med3D-style ViT encoders, MIA, fusion, UNETR decoders) and the
SAM-Med3D checkpoint loader."""

from cmc_train.network.cmc_net import CMCNet, CMCOutput, build_cmc
from cmc_train.network.sam_med3d import SamMed3DError, load_sam_med3d_encoder

__all__ = ["CMCNet", "CMCOutput", "SamMed3DError", "build_cmc",
           "load_sam_med3d_encoder"]
