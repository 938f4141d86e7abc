"""Latent decode attention, one module per backend (tokamax-style layout):

  reference   pure jnp, the ground truth every backend is tested against
  triton      Pallas Triton kernels (any CUDA GPU; pre-Hopper path)
  mosaic_gpu  Pallas Mosaic GPU kernel (Hopper: wgmma, TMA, warp roles)
  api         `latent_decode_attention(..., implementation=...)`
"""
