"""Kernels for the hot paths; temporary until the Triton dispatch lands."""
from .reference import masked_apply_, masked_gather, pack_mask, popcount, unpack_mask
