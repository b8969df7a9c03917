"""The one exception of the conversion package: a bad input, named in one line."""


class ConversionError(ValueError):
    """A checkpoint, file or config that cannot be converted; the message names the tensor, file
    or config key to blame. Raised before anything is written to the output."""
