"""`modules.sd_unet`: the active alternative UNet (TensorRT and the like), None when there is none."""

current_unet = None
