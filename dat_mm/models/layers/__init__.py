from .deformable_attention import DeformableAttention
from .mlp import ConvFFN, Mlp
from .neighborhood_attention import NeighborhoodAttention
from .norm import LayerNorm2d
from .window_attention import WindowAttention

__all__ = ['DeformableAttention', 'NeighborhoodAttention', 'WindowAttention', 'Mlp', 'ConvFFN', 'LayerNorm2d']
