"""The data package's one error type: a user mistake in data inputs, tokenizers or blends.

The CLI shows it as one line (launch/commands turn it into a UserError); it is raised before
anything is written under a final name.
"""


class DataError(ValueError):
    """Bad data input: a missing file, a malformed line under --strict, an unusable tokenizer."""
