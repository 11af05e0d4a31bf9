"""Generative models for purification (EBM, DDPM): networks, samplers, purifiers. Pure PyTorch."""
