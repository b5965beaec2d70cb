"""Training an SRM denoiser: the loss (`losses`), the train step and the loop (`trainer`)."""
