"""Error types raised by more than one stage. Each message names the file or key and says what to do."""


class CheckpointError(ValueError):
    """A checkpoint (or an encoder export) cannot be used: unreadable, not tubelet's, or not matching its
    config. Raised by the trainer's resume, the probe and `model.features`; the message names the file."""
