"""Native kernels for XLA backends, compiled from source on this machine (`build`)."""
