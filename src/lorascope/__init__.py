"""lorascope: LoRA under the microscope.

Accuracy, representational drift and serving cost of LoRA versus full fine-tuning,
measured by one reproducible pipeline (see the README).
"""

__version__ = "0.1.0"


class LorascopeError(Exception):
    """An error caused by the user's input (a file, a field, a value).

    The command line prints its message on one line and exits with status 2, without a
    traceback; anything else is a bug and keeps its traceback.
    """
