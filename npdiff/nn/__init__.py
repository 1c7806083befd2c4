"""Neural-network layers and models with hand-written backward passes.

  layers.py        conv2d, group/layer norm, SiLU, GELU, linear, embedding, timestep embedding,
                   upsample, concat, dropout: `xxx_forward -> (y, cache)`, `xxx_backward(dy, cache)`
  attention.py     multi-head self-attention and masked cross-attention
  unet.py          the denoising U-Net (UNetConfig, init_unet, unet_forward, unet_backward)
  text_encoder.py  the prompt encoder (TextEncoderConfig, init_text_encoder, text_encoder_forward, ...)
  optim.py         AdamW, EMA, gradient clipping, warmup + cosine learning rate
  gradcheck.py     finite-difference checks used by the tests
  mode.py          inference(): forward passes that keep nothing for a backward pass
"""
