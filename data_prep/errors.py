"""The one exception type for bad input to snlp-prepare."""

from __future__ import annotations

from snlp_lightning.errors import UserError


class PrepareError(UserError):
    """Bad input (missing path, no text field, vocab too small, ...); the message is one line that
    names the offending path or flag and says what is allowed. snlp-prepare prints it and exits 2."""
