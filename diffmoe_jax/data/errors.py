"""The one error type of the data pipeline."""


class DataError(ValueError):
  """Bad data or data config; the message names the field, file or size at fault and how to fix it."""
